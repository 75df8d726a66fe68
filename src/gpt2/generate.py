"""Sampling: logits processors, and the decode loop that uses the KV cache.

Each step turns the model's next-token logits (B, V) into one token per row.
The processors are small pure functions, always applied in this order:

    repetition_penalty   CTRL's penalty on tokens already in the row (prompt included)
    temperature          divide by T; T = 0 means greedy (argmax), no sampling at all
    top_k                keep exactly the k largest logits (ties do not widen the set)
    top_p                keep the smallest set of tokens whose probability reaches p

Filtered-out tokens get -inf, so softmax gives them probability 0. The order
matters: top-p measures probability *after* temperature and top-k, as in
Hugging Face's and OpenAI's samplers.

The decode loop (`stream`) runs the prompt through the model once (prefill),
keeping every layer's keys and values in a `KVCache`; each further step feeds
only the newest token. Three front ends share it:

    generate(model, idx, ...)          -> LongTensor (B, T + new), the prompt included
    stream(model, idx, ...)            -> yields the new tokens (B,) step by step
    generate_batch(model, prompts, ...) -> list of new-token lists, prompts of any length

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, temperature=0.0).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gpt2 import cpu_kernels
from gpt2.errors import GPT2Error
from gpt2.model import check_model

EOT = 50256  # <|endoftext|>: unconditional samples start from it, finished rows are padded with it

__all__ = [
    "EOT",
    "SamplingOptions",
    "TextStream",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "generate",
    "generate_batch",
    "process_logits",
    "sampling_vocab",
    "stream",
]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen; validated on construction (GPT2Error)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    vocab_size: int | None = None  # sample only ids below it (None: every logit)

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if self.top_k is not None:
            check_top_k(self.top_k)
        if self.top_p is not None:
            check_top_p(self.top_p)
        check_repetition_penalty(self.repetition_penalty)
        if self.vocab_size is not None:
            check_vocab_size(self.vocab_size)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_PENALTY_RANGE = (1e-6, 1e6)  # beyond it a penalised logit can overflow float32


def _check_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GPT2Error(f"{name} must be a number, got {value!r}")


def check_temperature(temperature: float) -> None:
    _check_number(temperature, "temperature")
    if not temperature >= 0.0 or temperature == float("inf"):  # `not >=` also rejects NaN
        raise GPT2Error(f"temperature must be a finite number >= 0 (0 means greedy), "
                        f"got {temperature}")


def check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GPT2Error(f"top-k must be an integer >= 1, got {k!r}")


def check_top_p(p: float) -> None:
    _check_number(p, "top-p")
    if not 0.0 < p <= 1.0:
        raise GPT2Error(f"top-p must be in (0, 1] (1 keeps every token), got {p}")


def plain_number(value):
    """A NumPy (or other numbers-registered) integer or real as Python's int or float, so
    that np.int64(3) passes where 3 does; anything else (bool included) as it is, for
    the checks to judge."""
    if isinstance(value, (int, float)) or value is None:  # (bool is an int)
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (None: fresh randomness); seeds
    are integers in [0, 2**64), what a generator holds."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
        return generator
    check_seed(seed)
    return generator.manual_seed(seed)


def check_finite(values: torch.Tensor, what: str = "logits") -> None:
    """GPT2Error unless every value is finite: sampling from NaN would pick tokens silently,
    and NaN shown as a probability or written as JSON is garbage (it waits for the device)."""
    if not bool(torch.isfinite(values).all()):
        _not_finite(what)


def _not_finite(what: str = "logits") -> None:
    raise GPT2Error(f"the model's {what} are NaN or infinite: its weights hold NaN or inf "
                    "(gpt2 validate MODEL checks every tensor), or its dtype overflows "
                    "(try fp32)")


class _FiniteWatch:
    """Every decode step's logits checked for NaN and inf, cheaply: their float32 sum is
    added to a running total on the device, which is NaN or infinite from the first step
    whose logits were (a sum costs ~20 us on a CPU where torch.isfinite(...).all() of a
    row costs ~130). Read back every step on a CPU, before the step's token is chosen;
    on other devices every `every` steps, since a read waits for the device."""

    def __init__(self, device: torch.device, every: int = 16) -> None:
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        self.every = 1 if device.type == "cpu" else every
        self.steps = 0

    def add(self, logits: torch.Tensor) -> None:
        self.total += logits.sum(dtype=torch.float32)
        self.steps += 1
        if self.steps % self.every == 0:
            self.check()

    def check(self) -> None:
        if self.steps and not bool(torch.isfinite(self.total)):
            _not_finite()


def check_vocab_size(n: int, n_vocab: int | None = None) -> None:
    """vocab_size: an integer >= 1, and at most the model's n_vocab where given."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GPT2Error(f"vocab_size must be an integer >= 1, got {n!r}")
    if n_vocab is not None and n > n_vocab:
        raise GPT2Error(f"vocab_size {n} is more than the model's {n_vocab} logits; "
                        f"give at most {n_vocab} (or None)")


def sampling_vocab(model, tokenizer) -> int | None:
    """The vocab_size to sample with: the tokenizer's size where the model has more
    logits than the tokenizer has tokens (nanoGPT pads 50,257 to 50,304), else None."""
    n = tokenizer.n_vocab
    return n if model.config.n_vocab > n else None


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise GPT2Error(f"seed must be an integer in [0, 2**64), got {seed!r}")


def check_repetition_penalty(penalty: float) -> None:
    _check_number(penalty, "repetition penalty")
    low, high = _PENALTY_RANGE
    if not low <= penalty <= high:  # (`not <=` also rejects NaN)
        raise GPT2Error(f"repetition penalty must be a number from {low:g} to {high:g} "
                        f"(1 means none; > 1 discourages repeats), got {penalty}")


# --------------------------------------------------------------------------- processors


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), for penalty > 1 a push away
    from tokens already present in the row.

    logits (B, V); seen (B, V) bool, True where the token occurs in the row.
    A seen token's logit is divided by `penalty` when positive and multiplied by
    it when negative, so the token always becomes less likely for penalty > 1
    (plain division would make negative logits *more* likely).

    >>> apply_repetition_penalty(torch.tensor([[2.0, -2.0, 2.0]]),
    ...                          torch.tensor([[True, True, False]]), 2.0)
    tensor([[ 1., -4.,  2.]])
    """
    check_repetition_penalty(penalty)
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it.

    Temperature 0 is greedy decoding, which never samples; it is handled by the
    caller (`choose_next`), so here it must be > 0. Each row's largest logit is taken
    off first (softmax does not change): at a tiny temperature the others then go to
    -inf and the largest stays 0, where dividing as they are would overflow to inf and
    make softmax NaN. A temperature too small for the logits' dtype to hold (1e-300 is
    0 in float32) is that limit itself: 0 for the largest, -inf for the rest (dividing
    by the 0 it became gave NaN, and every sample was the last id).
    """
    check_temperature(temperature)
    if temperature == 0.0:
        raise GPT2Error("temperature 0 is greedy decoding: take the argmax instead of scaling")
    if temperature == 1.0:
        return logits
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
    info = torch.finfo(logits.dtype)
    if temperature < info.tiny * info.eps:  # (the least subnormal: below it, 0 or near)
        return torch.where(shifted == 0, 0.0, float("-inf")).to(logits.dtype)
    return shifted / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (B, V); the rest become -inf.

    Uses the indices of `topk`, not a threshold at the k-th value: with ties at
    that value a threshold would keep more than k tokens.

    >>> apply_top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 3., -inf]])
    """
    check_top_k(k)
    if k >= logits.size(-1):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # (B, k) each
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(-1, indices, values)  # (B, V)


def apply_top_p(logits: torch.Tensor, p: float, *, adaptive: bool = True) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of the most
    likely tokens whose total probability reaches p; the rest become -inf.

    adaptive: look at the few dozen most likely tokens first and widen only if
    they fall short of p (fast, but reads a flag back to the host); False sorts
    whole rows with no read-back, as a CUDA graph or torch.compile(fullgraph) needs.

    A token is kept when the probability of the tokens ranked above it is still
    below p, so the most likely token is always kept and p = 1 keeps everything.
    When tokens of equal probability straddle the edge of the set, the lower ids
    are kept, so the set is both minimal and deterministic.

    >>> apply_top_p(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.8)
    tensor([[-0.6931, -1.2040,    -inf]])
    """
    check_top_p(p)
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V), float32 even for bf16 input
    if adaptive:
        top = _top_probs_reaching(probs, p)  # (B, k), descending
    else:
        top = torch.sort(probs, dim=-1, descending=True).values  # (B, V)
    mass_above = torch.cumsum(top, dim=-1) - top  # (B, k): probability ranked above each
    # (B, 1) nucleus size, >= 1 (a p too small for float32 is 0 there: the top token)
    n = (mass_above < p).sum(dim=-1, keepdim=True).clamp_(min=1)
    edge = top.gather(-1, n - 1)  # (B, 1): the smallest probability in the nucleus
    above = probs > edge  # (B, V): in the nucleus for sure
    ties = probs == edge  # (B, V): as likely as the edge token; keep the lowest ids
    room = n - above.sum(dim=-1, keepdim=True)  # (B, 1), >= 1
    keep = above | (ties & (ties.cumsum(dim=-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def _top_probs_reaching(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The k largest probabilities of each row (B, k), descending, for a k large
    enough that every row's top k already hold mass >= p.

    Sorting a 50,257-wide row costs far more than a small `topk`, and the nucleus
    of a language model is usually a few dozen tokens: try small k first.
    """
    V = probs.size(-1)
    k = min(V, 64)
    while True:
        top = torch.topk(probs, k, dim=-1).values  # (B, k), sorted descending
        if k == V or bool((top.cumsum(dim=-1)[:, -1] >= p).all()):
            return top
        k = min(V, k * 16)


def process_logits(
    logits: torch.Tensor,
    options: SamplingOptions,
    *,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """All processors in the documented order: repetition penalty -> temperature
    -> top-k -> top-p. For greedy options (temperature 0) only the penalty applies.
    With options.vocab_size the logits past it are dropped first: (B, vocab_size).

    logits (B, V); seen (B, V) bool, needed when repetition_penalty != 1.
    """
    if options.vocab_size is not None:
        logits = logits[:, : options.vocab_size]
        seen = None if seen is None else seen[:, : options.vocab_size]
    if options.repetition_penalty != 1.0:
        if seen is None:
            raise GPT2Error("repetition_penalty needs `seen`, the tokens already in each row")
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return logits
    logits = apply_temperature(logits, options.temperature)
    if options.top_k is not None:
        logits = apply_top_k(logits, options.top_k)
    if options.top_p is not None:
        logits = apply_top_p(logits, options.top_p)
    return logits


def choose_next(
    logits: torch.Tensor,
    options: SamplingOptions,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token logits (B, V) -> token ids (B,): argmax when greedy, else a sample
    from softmax of the processed logits."""
    logits = process_logits(logits.float(), options, seen=seen)  # (B, V)
    if options.greedy:
        return cpu_kernels.argmax(logits)  # (B,): logits.argmax(-1), faster on a CPU
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return sample_from(probs, generator=generator)


def sample_from(probs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), drawn by inverting the cumulative distribution.

    Needs a single uniform number per row, where `torch.multinomial` spends
    several milliseconds on a 50,257-token row on CPU. The sum is taken in float64
    and the uniform scaled by the row's total, so rounding cannot skew the draw; a
    token of probability 0 is never chosen (its cdf step is empty).
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    token = torch.searchsorted(cdf, u, right=True)  # (B, 1): first index with cdf > u
    return token.squeeze(-1).clamp_(max=probs.size(-1) - 1)  # (B,)


# --------------------------------------------------------------------------- the decode loop


def stream(
    model,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    sliding_window: bool = False,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Continue each row of idx (B, T), yielding the new token ids (B,) one step at a time.

    Arguments are those of `generate`. A row that has produced one of
    `stop_tokens` is finished: from the next step on it yields the padding id
    (<|endoftext|>, or 0 for vocabularies without it), and the loop ends early
    once every row is finished. Nothing is computed until the first `next()`. Each
    step runs in evaluation mode and torch.inference_mode; between steps the model
    and the caller's code are in their own modes again.

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> [t.tolist() for t in stream(model, torch.tensor([[1]]), max_new_tokens=2,
    ...                             temperature=0.0)]  # doctest: +ELLIPSIS
    [[...], [...]]
    """
    check_model(model)
    max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, vocab_size = map(
        plain_number, (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                       vocab_size))
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, vocab_size)
    if vocab_size is not None:
        check_vocab_size(vocab_size, model.config.n_vocab)
    if not isinstance(sliding_window, bool):
        raise GPT2Error(f"sliding_window must be True or False, got {sliding_window!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise GPT2Error(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    idx, attention_mask = _check_prompt(model, idx, attention_mask)
    n_ctx = model.config.n_ctx
    # The last new token is never fed to the model: prompt + new may be n_ctx + 1
    if not sliding_window and idx.size(1) + max_new_tokens > n_ctx + 1:
        raise GPT2Error(
            f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{idx.size(1) + max_new_tokens} tokens exceeds the model's context of {n_ctx} "
            f"(plus the last new token, which is never fed back: {n_ctx + 1}); shorten the "
            "prompt, ask for fewer tokens, or use --sliding-window (sliding_window=True) to "
            "keep only the most recent tokens"
        )
    return _decode(model, idx, attention_mask, max_new_tokens, options,
                   _stop_set(stop_tokens, model.config.n_vocab), seed)


def generate(
    model,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    sliding_window: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Continue each row of idx (B, T) -> LongTensor (B, T + new), the prompt included.

    temperature: 0.0 is greedy (argmax); otherwise logits are divided by it before
        sampling. top_k / top_p / repetition_penalty: see the module docstring.
    stop_tokens: ids that end a row (kept in the output). Rows that stop early are
        padded after their stop token with <|endoftext|> (0 where the vocabulary has
        no id 50256); once every row has stopped generation ends, so `new` can be
        less than max_new_tokens. `generate_batch` returns exact per-row lists.
    seed: same seed and arguments -> same tokens (a torch.Generator on the model's
        device); None draws fresh randomness.
    attention_mask (B, T): 1 for real tokens, 0 for LEFT padding of shorter prompts.
    sliding_window: when T + max_new_tokens exceeds the context (n_ctx), drop the
        oldest tokens instead of raising GPT2Error. Whenever the window is full the
        cache is rebuilt over the most recent 3/4 n_ctx tokens (absolute position
        embeddings make old keys invalid once positions shift), so every new token
        sees between 3/4 n_ctx and n_ctx tokens of context at the cost of one
        prefill of 3/4 n_ctx tokens per n_ctx/4 new tokens. In a padded batch the
        window is counted in columns, padding included, so its rows slide together.
    vocab_size: sample only ids below it: for a model whose embedding has more rows
        than its tokenizer has tokens (nanoGPT pads GPT-2's 50,257 to 50,304), pass
        the tokenizer's `n_vocab`, so no id the tokenizer cannot decode comes out.
    An empty prompt (T = 0) starts from <|endoftext|>, which is then part of the output.

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, seed=0)
    >>> out.shape, out[0, :2].tolist()
    (torch.Size([1, 5]), [1, 2])
    """
    steps = stream(
        model, idx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
        seed=seed, attention_mask=attention_mask, sliding_window=sliding_window,
        vocab_size=vocab_size,
    )
    idx, _ = _check_prompt(model, idx, attention_mask)
    new = [token.unsqueeze(1) for token in steps]  # each (B, 1)
    return torch.cat([idx, *new], dim=1)  # (B, T + new)


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    sliding_window: bool = False,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Continue prompts of different lengths in one batch -> the new tokens of each.

    Prompts are padded on the LEFT, so every row's newest token sits in the same
    column, with an attention mask hiding the padding and position ids counting
    real tokens only (cumsum(mask) - 1): a padded prompt gets the same positions,
    hence the same continuation, as the prompt on its own. An empty prompt starts
    from <|endoftext|>. Each list ends at its stop token (included) or after
    max_new_tokens tokens.

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> [len(r) for r in generate_batch(model, [[1, 2, 3], [4]], max_new_tokens=2)]
    [2, 2]
    """
    check_model(model)
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) \
            or any(isinstance(p, (str, bytes)) or not isinstance(p, Sequence) for p in prompts):
        raise GPT2Error("prompts must be a list of token-id lists (tokenizer.encode each "
                        "text); for a (B, T) tensor of equal-length prompts use generate")
    if not prompts:
        return []
    eot = _pad_id(model)
    rows = [list(p) if len(p) else [eot] for p in prompts]
    if any(isinstance(t, bool) or not isinstance(t, int) for r in rows for t in r):
        raise GPT2Error("prompts must hold token ids: integers")
    width = max(len(r) for r in rows)
    device = model.wte.weight.device
    idx = torch.full((len(rows), width), eot, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    padded = bool((mask == 0).any())
    steps = stream(
        model, idx.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        stop_tokens=stop_tokens, seed=seed,
        attention_mask=mask.to(device) if padded else None, sliding_window=sliding_window,
        vocab_size=vocab_size,
    )
    stops = _stop_set(stop_tokens, model.config.n_vocab)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for token in steps:
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stops
    return out


# --------------------------------------------------------------------------- internals


def _decode(
    model,
    idx: torch.Tensor,
    mask: torch.Tensor | None,
    max_new_tokens: int,
    options: SamplingOptions,
    stops: frozenset[int],
    seed: int | None,
) -> Iterator[torch.Tensor]:
    """The loop behind `stream`: prefill, then one cached position per new token, with
    the model in evaluation mode (no dropout) and put back as it was at the end."""
    B, T = idx.shape
    n_ctx = model.config.n_ctx
    device = idx.device
    generator = seeded_generator(seed, device)
    seen = None  # (B, V) bool: which tokens each row holds, for the repetition penalty
    if options.repetition_penalty != 1.0:
        real = torch.ones_like(idx) if mask is None else mask
        counts = torch.zeros(B, model.config.n_vocab, dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, idx, real) > 0  # padding adds 0
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = torch.tensor(_pad_id(model), device=device)

    # Only a sliding window needs the whole sequence again (to rebuild the cache).
    history = _History(idx, mask, max_new_tokens) if T + max_new_tokens > n_ctx else None
    window = _Window(model, idx[:, -n_ctx:], None if mask is None else mask[:, -n_ctx:],
                     capacity=min(T + max_new_tokens, n_ctx))
    def pick(logits: torch.Tensor) -> torch.Tensor:
        token = choose_next(logits, options, seen=seen, generator=generator)  # (B,)
        if stop_ids is not None:
            token = torch.where(finished, pad, token)  # finished rows emit padding
            finished.logical_or_(torch.isin(token, stop_ids))
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        return token

    # The model runs in evaluation mode and inference mode step by step, not around the
    # yields: the caller's code between two tokens runs in its own modes (and another
    # stream may run there).
    decoding = _Decoding(model)
    with decoding:
        logits = window.prefill()  # (B, V)
        check_finite(logits)
        watch = _FiniteWatch(device)  # and every step's after the prompt's
        token = pick(logits)
    for step in range(max_new_tokens):
        yield token
        with decoding:
            if step == max_new_tokens - 1 or (stop_ids is not None and bool(finished.all())):
                watch.check()  # (where steps since the last read were not read yet)
                return
            if history is not None:
                history.append(token)
            if window.full:
                # Positions would shift, which invalidates every cached key: rebuild the
                # cache over the most recent 3/4 of the context and carry on from there.
                keep = n_ctx - n_ctx // 4
                recent, recent_mask = history.last(keep)
                window = _Window(model, recent, recent_mask, capacity=n_ctx)
                logits = window.prefill()
            else:
                logits = window.step(token)
            watch.add(logits)
            token = pick(logits)


class _Decoding:
    """`with` it around each step of a decode: the model in evaluation mode (no dropout)
    and torch.inference_mode, both as they were again after the step. (model.eval() walks
    every module, ~0.3 ms for 124M: a model already in evaluation mode is left alone.)"""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.training = model.training
        self.inference: torch.inference_mode | None = None  # (a new one for each step)

    def __enter__(self) -> None:
        if self.training:
            self.model.eval()
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def __exit__(self, *exc) -> None:
        try:
            self.inference.__exit__(*exc)
        finally:
            if self.training:
                self.model.train()


class _History:
    """Every token so far (B, T + max_new), kept only when the window may slide."""

    def __init__(self, idx: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int):
        B, T = idx.shape
        self.ids = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        self.ids[:, :T] = idx
        self.mask = None
        if mask is not None:
            self.mask = torch.ones_like(self.ids)
            self.mask[:, :T] = mask
        self.length = T

    def append(self, token: torch.Tensor) -> None:
        self.ids[:, self.length] = token
        self.length += 1

    def last(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The most recent n tokens (B, n) and their mask (None when nothing is padded)."""
        start = self.length - n
        ids = self.ids[:, start:self.length]
        if self.mask is None:
            return ids, None
        mask = self.mask[:, start:self.length]
        if bool(mask.all()):
            return ids, None  # the padding has slid out of the window
        if bool((mask.sum(dim=1) == 0).any()):
            raise AssertionError("a window of only padding: a prompt must end in real tokens")
        return ids, mask


class _Window:
    """The KV cache over at most n_ctx positions, then fed one token per row per step.

    Preallocates what a step needs (cache, attention mask, position ids), so a decode
    step is one forward call plus in-place writes. Unpadded batches pass no mask at
    all, which lets attention take its fastest path.
    """

    def __init__(self, model, idx: torch.Tensor, mask: torch.Tensor | None, *, capacity: int):
        B, T = idx.shape
        self.model = model
        self.idx = idx
        self.n_ctx = model.config.n_ctx
        self.cache = model.new_cache(B, max_len=capacity)
        self.length = T  # positions in the cache once prefilled
        self.mask = None
        self.next_pos = None
        if mask is not None:
            # (B, capacity): the mask over cached + new positions; new tokens are real
            self.mask = torch.ones(B, capacity, dtype=torch.long, device=idx.device)
            self.mask[:, :T] = mask
            # a row's next position is the number of real tokens before it
            self.next_pos = mask.sum(dim=1, keepdim=True)  # (B, 1)
        self._recorded = None  # unpadded rows on a CPU: the step replayed by TorchScript
        if mask is None and idx.device.type == "cpu":
            from gpt2.traced_step import cpu_step

            self._recorded = cpu_step(model, self.cache, planned_steps=capacity - T)

    @property
    def full(self) -> bool:
        return self.length >= self.n_ctx

    def prefill(self) -> torch.Tensor:
        """Run the window's tokens through the model -> the last position's logits (B, V)."""
        T = self.idx.size(1)
        position_ids = mask = None
        if self.mask is not None:
            mask = self.mask[:, :T]
            position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T); padding -> 0
        logits = self.model(self.idx, position_ids=position_ids, attention_mask=mask,
                            cache=self.cache, last_only=True)  # (B, 1, V)
        return logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,) -> the next logits (B, V)."""
        S = self.length + 1
        if self._recorded is not None:
            self.length = S
            return self._recorded(token)  # (B, V)
        if self.mask is None:
            logits = self.model(token.unsqueeze(1), cache=self.cache, last_only=True)
        else:
            logits = self.model(token.unsqueeze(1), position_ids=self.next_pos,
                                attention_mask=self.mask[:, :S], cache=self.cache,
                                last_only=True)  # (B, 1, V)
            self.next_pos = self.next_pos + 1
        self.length = S
        return logits[:, -1]


def _check_prompt(model, idx, attention_mask):
    """Validate idx (B, T) and its mask; an empty prompt becomes <|endoftext|>."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise GPT2Error("idx must be a 2-D LongTensor (batch, tokens)")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise GPT2Error(f"idx holds {idx.dtype}, not token ids: give an integer tensor "
                        "(torch.long)")
    if idx.size(0) == 0:
        raise GPT2Error("idx has no rows: give at least one prompt")
    device = model.wte.weight.device
    idx = idx.to(device=device, dtype=torch.long)
    if idx.size(1) == 0:
        idx = torch.full((idx.size(0), 1), _pad_id(model), dtype=torch.long, device=device)
        attention_mask = None
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= model.config.n_vocab):
        raise GPT2Error(f"token ids must be in [0, {model.config.n_vocab}) for this model, "
                        f"got {int(idx.min())}..{int(idx.max())}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise GPT2Error("attention_mask must be a tensor of 0 (padding) and 1 (token)")
        if tuple(attention_mask.shape) != tuple(idx.shape):
            raise GPT2Error(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                            f"expected {tuple(idx.shape)} like idx")
        binary = attention_mask.to(device=device)
        if not bool(((binary == 0) | (binary == 1)).all()):
            raise GPT2Error("attention_mask must hold only 0 (padding) and 1 (a token)")
        attention_mask = binary.to(dtype=torch.long)
        if bool((attention_mask[:, -1] == 0).any()):
            raise GPT2Error("attention_mask: pad prompts on the LEFT (the last column must be "
                            "a real token in every row)")
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise GPT2Error("attention_mask: padding goes before the prompt (LEFT), as one "
                            "block: a 0 after a 1 in a row is a gap inside the prompt")
        if bool(attention_mask.all()):
            attention_mask = None  # nothing is padded: let attention take its unmasked path
    return idx, attention_mask


def _stop_set(stop_tokens: Sequence[int] | None, n_vocab: int) -> frozenset[int]:
    """stop_tokens (ids, or one id) as a set, each checked to be a token id of the model."""
    if stop_tokens is None:
        return frozenset()
    if hasattr(stop_tokens, "tolist") and not isinstance(stop_tokens, (str, bytes)):
        stop_tokens = stop_tokens.tolist()  # a tensor or numpy array (or numpy integer)
    if isinstance(stop_tokens, numbers.Integral) and not isinstance(stop_tokens, bool):
        stop_tokens = [stop_tokens]
    elif isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise GPT2Error(f"stop_tokens must be token ids (a list of ints), got {stop_tokens!r}")
    ids = list(_flat(stop_tokens))
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
           or not 0 <= t < n_vocab]
    if bad:
        raise GPT2Error(f"stop_tokens: {bad[0]!r} is not a token id of this model (integers "
                        f"in [0, {n_vocab}))")
    return frozenset(int(t) for t in ids)


def _flat(items):
    """Nested lists (a 2-D tensor's tolist()) as one sequence."""
    for item in items:
        if isinstance(item, list):
            yield from _flat(item)
        else:
            yield item


def _pad_id(model) -> int:
    return EOT if model.config.n_vocab > EOT else 0


# --------------------------------------------------------------------------- text out


class TextStream:
    """Token ids in, printable text out, for showing a sample as it is generated.

    A token can end in the middle of a UTF-8 character (emoji often take two or
    three tokens), so bytes are decoded incrementally and only whole characters
    come out. The sample ends at a stop token (not shown) or before the first
    occurrence of a stop string (not shown either); text that could be the start
    of a stop string is held back until the next tokens settle it.

    >>> tok = Tokenizer.from_pretrained()  # doctest: +SKIP
    >>> s = TextStream(tok, stop_strings=["\\n\\n"])  # doctest: +SKIP
    >>> [s.push(t) for t in tok.encode("Hi\\n\\nthere")] + [s.finish()]  # doctest: +SKIP
    ['Hi', '', '']
    """

    def __init__(
        self,
        tokenizer,
        *,
        stop_strings: Sequence[str] = (),
        stop_tokens: Sequence[int] = (),
    ) -> None:
        import codecs

        one = isinstance(stop_strings, str)
        if not one and isinstance(stop_strings, Iterable):
            stop_strings = tuple(stop_strings)
        if one or not isinstance(stop_strings, tuple) \
                or not all(isinstance(s, str) for s in stop_strings):
            raise GPT2Error(f"stop_strings takes a list of strings, not {stop_strings!r:.60}"
                            + ("; wrap one in a list" if one else ""))
        if any(s == "" for s in stop_strings):
            raise GPT2Error("a stop string must not be empty")
        if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
            raise GPT2Error(f"stop_tokens takes a list of token ids, not {stop_tokens!r:.60}")
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop_strings = tuple(stop_strings)
        self._stop_tokens = frozenset(stop_tokens)
        self.ids: list[int] = []  # every token pushed, including the one that ended the sample
        self.text = ""  # the sample's text so far (final once `done`)
        self.done = False
        self._shown = 0  # characters of `text` already returned

    def push(self, token: int) -> str:
        """Add one token -> the text that can be shown now (possibly "")."""
        if self.done:
            return ""
        self.ids.append(token)
        if token in self._stop_tokens:
            return self._end(self._decoder.decode(b"", final=True))
        return self._release(self._decoder.decode(self._tokenizer.decode_bytes([token])))

    def finish(self) -> str:
        """No more tokens: whatever is still held back (text that was not a stop string)."""
        if self.done:
            return ""
        return self._end(self._decoder.decode(b"", final=True))

    def _release(self, new_text: str) -> str:
        self.text += new_text
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            self.done = True
            return self._show(cut)
        return self._show(max(len(self.text) - self._held_back(), self._shown))

    def _end(self, new_text: str) -> str:
        out = self._release(new_text)
        if self.done:
            return out
        self.done = True
        return out + self._show(len(self.text))

    def _find_stop(self) -> int | None:
        # A stop string can only start in text not yet shown: anything that could
        # have begun one was held back.
        hits = [i for s in self._stop_strings if (i := self.text.find(s, self._shown)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        longest = 0
        for s in self._stop_strings:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _show(self, upto: int) -> str:
        out, self._shown = self.text[self._shown:upto], upto
        return out
