"""How well a model predicts a text: negative log-likelihood and perplexity.

A text longer than the context is scored with a sliding window, the method of
Hugging Face's perplexity guide: windows of `max_length` tokens start every
`stride` tokens; in each window only the tokens no earlier window scored are
scored, each predicted from everything before it in its window. With
stride = max_length the windows do not overlap (fast; a token near a window's
start sees little context); a smaller stride gives every scored token at least
max_length - stride tokens of context, at max_length / stride times the cost.

Every token except the first is scored exactly once (the first has nothing to
be predicted from; `bos=True` puts <|endoftext|> before it so it is scored too,
as GPT-2 saw documents in training). This differs in one detail from the loop
printed in the guide: there each window's labels are its own inputs, so the
token at the start of a window is never scored when windows do not overlap.
Here a window's inputs predict the tokens *after* them, ids[b+1 : b+max_length+1],
so no token is skipped, and the count of scored tokens is exact.

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> result = score(model, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], stride=4)
    >>> result.tokens
    9
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpt2.errors import GPT2Error
from gpt2.generate import EOT, plain_number  # EOT: put before the text by bos=True
from gpt2.model import check_model, eval_mode


@dataclass(frozen=True)
class ScoreResult:
    """tokens: how many tokens were scored; total_nll: their summed negative
    log-likelihood in nats; nll: its mean per token; ppl: exp(nll) (inf past a mean of
    ~709.8 nats, where a float overflows: a model that has not learned, or is broken).
    token_nll (with per_token=True, else None): each scored token's NLL in nats, in
    order, float64 (tokens,): without bos entry i is ids[i + 1]'s, with bos ids[i]'s."""

    tokens: int
    total_nll: float
    nll: float
    ppl: float
    token_nll: np.ndarray | None = None

    @classmethod
    def from_total(cls, total_nll: float, tokens: int,
                   token_nll: np.ndarray | None = None) -> ScoreResult:
        nll = total_nll / tokens
        return cls(tokens=tokens, total_nll=total_nll, nll=nll,
                   ppl=math.exp(nll) if nll < 709.78 else math.inf, token_nll=token_nll)


def score(
    model,
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    stride: int | None = None,
    max_length: int | None = None,
    bos: bool = False,
    batch_size: int = 1,
    per_token: bool = False,
) -> ScoreResult:
    """Score a token sequence with a sliding window -> ScoreResult.

    ids: a list, 1-D numpy array (a memmap of a token file works: it is read one
        window at a time) or 1-D LongTensor.
    max_length: window length in tokens (default and maximum: the model's n_ctx).
    stride: how far each window starts after the previous one (default max_length).
    bos: put <|endoftext|> before the text so its first token is scored too.
    batch_size: windows run through the model together; memory grows with
        batch_size * max_length * n_vocab (the logits), so raise it on GPUs.
    per_token: also return every scored token's NLL (ScoreResult.token_nll).

    >>> from gpt2 import GPT2, GPT2Config

    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> score(model, [3, 1, 4, 1, 5], bos=False).tokens
    4
    """
    check_model(model)
    stride, max_length, batch_size = map(plain_number, (stride, max_length, batch_size))
    n_ctx = model.config.n_ctx
    max_length = n_ctx if max_length is None else max_length
    stride = max_length if stride is None else stride
    _check_window(max_length, stride, n_ctx)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GPT2Error(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for name, flag in (("bos", bos), ("per_token", per_token)):
        if not isinstance(flag, bool):  # "no" would be true
            raise GPT2Error(f"{name} must be True or False, got {flag!r}")
    tokens = _Tokens(ids, bos=bos, n_vocab=model.config.n_vocab)
    if len(tokens) < 2:
        hint = "" if bos else "; with bos=True (--bos) a single token can be scored"
        raise GPT2Error(f"the text is {len(tokens) - int(bos)} token(s): scoring needs at "
                        f"least two, as the first is only context{hint}")

    device = model.wte.weight.device
    total = 0.0
    token_nll = np.empty(len(tokens) - 1) if per_token else None
    with eval_mode(model), torch.inference_mode():
        for batch in _batches(_windows(len(tokens), max_length, stride), batch_size):
            total += _score_batch(model, tokens, batch, device, token_nll)
    if not math.isfinite(total):
        raise GPT2Error("the model's log-likelihoods are NaN or infinite: its weights hold "
                        "NaN or inf (gpt2 validate MODEL checks a forward pass), or its "
                        "dtype overflows (try fp32)")
    return ScoreResult.from_total(total, len(tokens) - 1, token_nll)


def _check_window(max_length: int, stride: int, n_ctx: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise GPT2Error(f"max_length must be an integer >= 2, got {max_length!r}")
    if max_length > n_ctx:
        raise GPT2Error(f"max_length {max_length} (--max-length) exceeds the model's context "
                        f"of {n_ctx} tokens; use at most {n_ctx}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise GPT2Error(f"stride must be an integer from 1 to max_length ({max_length}), "
                        f"got {stride!r}")


@dataclass(frozen=True)
class _Window:
    begin: int  # inputs are tokens [begin, end) ...
    end: int  # ... and predict tokens [begin + 1, end + 1)
    first: int  # the first token this window scores; earlier ones were scored before


def _windows(n: int, max_length: int, stride: int) -> Iterator[_Window]:
    """The windows over n tokens; together they score tokens 1..n-1, each once."""
    first, begin = 1, 0
    while first < n:
        end = min(begin + max_length, n - 1)
        yield _Window(begin, end, first)
        first, begin = end + 1, begin + stride


def _batches(windows: Iterator[_Window], batch_size: int) -> Iterator[list[_Window]]:
    """Group windows of the same length (all but the last are max_length long)."""
    batch: list[_Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _score_batch(model, tokens: _Tokens, batch: list[_Window], device,
                 token_nll: np.ndarray | None) -> float:
    """Summed NLL (nats) of the tokens the windows in `batch` score; each token's into
    token_nll[position - 1] where that is given."""
    chunks = [tokens.slice(w.begin, w.end + 1) for w in batch]  # inputs plus the next token
    ids = torch.stack(chunks).to(device)  # (B, L + 1)
    L = ids.size(1) - 1
    # only positions that predict a token not scored before need logits
    keep = L - min(w.first - 1 - w.begin for w in batch)
    logits = model(ids[:, :-1], keep_last=keep)  # (B, keep, V)
    total = 0.0
    for row, w in enumerate(batch):
        start = w.first - 1 - w.begin  # the input position that predicts token `first`
        lstart = start - (L - keep)  # ... and its row in the kept logits
        # per row keeps the float32 copy and log-softmax temporaries to one window
        if token_nll is None:
            nll = F.cross_entropy(logits[row, lstart:].float(), ids[row, start + 1:],
                                  reduction="sum")
            total += float(nll)
            continue
        each = F.cross_entropy(logits[row, lstart:].float(), ids[row, start + 1:],
                               reduction="none").double().cpu().numpy()
        token_nll[w.first - 1: w.first - 1 + len(each)] = each
        total += float(each.sum())
    return total


class _Tokens:
    """The ids to score, read a window at a time; bos puts EOT in front without a copy."""

    def __init__(self, ids, *, bos: bool, n_vocab: int) -> None:
        if isinstance(ids, (str, bytes)):
            raise GPT2Error("score takes token ids, not text: pass tokenizer.encode(text)")
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu()
        elif not isinstance(ids, np.ndarray):
            if not isinstance(ids, Sequence):  # (a set has no order; a generator, no length)
                raise GPT2Error(f"score takes a sequence of token ids (a list, array or "
                                f"tensor), not {type(ids).__name__}")
            try:
                ids = np.asarray(ids)
            except ValueError:  # rows of different lengths
                raise GPT2Error("ids must be one sequence of token ids (1-D)") from None
            if ids.dtype == object:  # ints too large for any integer dtype, or mixed items
                raise GPT2Error("ids must be token ids: integers below 2**63")
        if ids.ndim != 1:
            raise GPT2Error(f"ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
        integer = (ids.dtype not in (torch.bool, torch.uint64) and not ids.is_floating_point()
                   and not ids.is_complex() if isinstance(ids, torch.Tensor)
                   else ids.size == 0 or ids.dtype.kind in "iu" and ids.dtype != np.uint64)
        if not integer:
            raise GPT2Error(f"ids must be integers (int64 or narrower), got dtype {ids.dtype}")
        if bos and n_vocab <= EOT:
            raise GPT2Error(f"bos needs <|endoftext|> (id {EOT}) but this model's vocabulary "
                            f"has {n_vocab} tokens")
        self.ids = ids
        self.offset = int(bos)
        self.n_vocab = n_vocab

    def __len__(self) -> int:
        return len(self.ids) + self.offset

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as a LongTensor, checked against the vocabulary."""
        lo, hi = max(start - self.offset, 0), stop - self.offset
        part = torch.as_tensor(np.asarray(self.ids[lo:hi], dtype=np.int64))
        if part.numel() and (int(part.min()) < 0 or int(part.max()) >= self.n_vocab):
            raise GPT2Error(f"token ids must be in [0, {self.n_vocab}) for this model; "
                            f"found {int(part.min())}..{int(part.max())} near position {lo}")
        if start < self.offset:
            part = torch.cat([torch.tensor([EOT]), part])
        return part
