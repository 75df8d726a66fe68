"""Fast decoding: a fixed-shape decode step, replayed as one CUDA graph per token.

A decode step of the normal path (`gpt2.generate`) feeds one token per row
through `GPT2.forward`, whose cache returns a slice that grows by one each
step. On a GPU the step is then bound by Python and kernel launches, not by
arithmetic: a 124M step is some 250 small kernels. This module rewrites the
step so that every tensor has the same shape and address at every step:

    token (B,), pos (1,)                      static input buffers
      -> wte[token] + wpe[pos]                 (B, C)
      -> n_layer x block_step:                 ln_1, c_attn, write k/v into cache slot `pos`,
                                               attend over ALL max_len slots with the mask
                                               `slot <= pos`, c_proj, ln_2, MLP
      -> ln_f, x @ wte.T, pick the next token  greedy, or top-k/top-p sampling on the GPU
      -> token, out[:, pos + 1], pos += 1      static output buffers, updated in place

Because nothing in it depends on a value read back to the host, the whole step
can be captured once as a `torch.cuda.CUDAGraph` and replayed per token with a
single launch; `torch.compile` of the per-layer function fuses its small ops
first (one compilation serves every layer: the layers differ only in weights).
At batch 1 on a GPU the compiled function is `block_step_one_row`, the same
block written as sums, which the compiler turns into its own fused kernels
(faster there than cuBLAS and SDPA; figures in bench/GPU_NOTES.md).

Two classes share the logic:

    StaticDecoder(model, batch_size=, max_len=)      runs the step eagerly, on any device;
                                                     the tests check it against the normal
                                                     cached path and against transformers
    CudaGraphDecoder(model, batch_size=, max_len=)   the same step, compiled and captured

Sampling draws its randomness outside the graph: before each replay one kernel
fills a static buffer with Exp(1) noise from a seeded generator, and the graph
picks argmax(p / noise), which is a sample from p (the "exponential race":
argmin_i E_i / p_i is distributed as p). So a seed reproduces the same tokens,
though not the same ones as `gpt2.generate`, which uses `torch.multinomial`.
Greedy decoding (temperature 0) gives the tokens of the normal path.

    >>> from gpt2.config import GPT2Config
    >>> from gpt2.model import GPT2
    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> StaticDecoder(model, batch_size=1, max_len=8).generate(
    ...     torch.tensor([[1, 2]]), max_new_tokens=3, temperature=0.0).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import cpu_kernels, gpu_kernels
from gpt2.errors import GPT2Error
from gpt2.generate import (
    SamplingOptions,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    check_finite,
    check_vocab_size,
    seeded_generator,
)
from gpt2.model import check_model
from gpt2.products import matmul_t, project

__all__ = [
    "CudaGraphDecoder",
    "StaticDecoder",
    "block_step",
    "block_step_one_row",
    "decode_step",
    "pick_next",
]

# The smallest positive float32: noise is clamped to it, so a filtered token
# (probability 0) gives 0 / tiny = 0 and can never win, even when its noise is 0.
_TINY = torch.finfo(torch.float32).tiny

# A compiled GPU decoder for one row uses `block_step_one_row` (products and
# attention as reductions that torch.compile fuses) instead of `block_step`.
# The attention (with the two cache writes) in each: "reduce" (as reductions),
# "sdpa" (PyTorch's scaled_dot_product_attention) or "fused" (one Triton kernel,
# `gpt2.gpu_kernels.decode_attention`: at one row on an H200 2,303 tokens/s
# against 2,006 with "reduce"; at 32 rows, compiled, 50,503 against 41,419 with
# "sdpa"; a CPU, or a GPU without Triton, takes SDPA instead).
# What a decoder compiles is compiled with inductor's coordinate-descent tuning
# (a few seconds more at the first call). Measured choices: bench/GPU_NOTES.md.
ONE_ROW_REDUCTIONS = True
ONE_ROW_ATTENTION = "fused"
BATCHED_ATTENTION = "fused"
TUNE_COMPILED_KERNELS = True


# --------------------------------------------------------------------------- the step


def block_step(
    block: nn.Module,
    x: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    visible: torch.Tensor | None,
) -> torch.Tensor:
    """One transformer block for one new token per row, over a preallocated cache.

    x (B, C): the residual stream; k_cache, v_cache (B, nh, L, hs): this layer's
    cache, written in place at slot pos (1,); visible (1, 1, 1, L) bool: the
    slots filled so far, this one included (None: all L are). Returns the new
    residual (B, C). The products go through `gpt2.products.project`, as in the
    normal forward (on a CPU, a matrix-vector product for one row); the
    attention is BATCHED_ATTENTION's.

    Uses the block's Linear and LayerNorm modules only (not Block.forward, whose
    per-layer names would make torch.compile specialise on each layer), so one
    compiled version serves every block of the model.
    """
    return _block(block, x, k_cache, v_cache, pos, visible, project=project,
                  attention=_batched_attention(x))


def _batched_attention(x: torch.Tensor) -> Callable:
    """BATCHED_ATTENTION's function; SDPA where the Triton kernel cannot run fast: on a
    CPU (only Triton's interpreter runs it there) or a GPU without Triton."""
    if BATCHED_ATTENTION == "fused" and not (x.is_cuda and gpu_kernels.available()):
        return _sdpa
    return _ATTENTION[BATCHED_ATTENTION]


def block_step_one_row(
    block: nn.Module,
    x: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    visible: torch.Tensor | None,
) -> torch.Tensor:
    """`block_step` for a batch of one row, written for torch.compile on a GPU.

    Same arguments and result. At one row every product is a matrix-vector
    product and the attention is one query: the work is reading weights and the
    cache, and the cost is kernels. Written as elementwise products and sums
    (weight (out, in) * x, summed over in; q * keys, summed over hs; weights *
    values, summed over slots), torch.compile turns each into one reduction
    kernel and fuses into it what comes before or after (the mask, the softmax's
    scaling, bias, GELU, the residual add), instead of calling cuBLAS and SDPA.
    Sums run in float32, as theirs do. The attention is ONE_ROW_ATTENTION's.
    Measured against `block_step` in bench/gpu_profile.py (GPU_NOTES.md has the
    figures).
    """
    return _block(block, x, k_cache, v_cache, pos, visible, project=_matvec,
                  attention=_ATTENTION[ONE_ROW_ATTENTION])


def _block(block, x, k_cache, v_cache, pos, visible, *, project, attention) -> torch.Tensor:
    """The body of both block steps: project(layer, x) runs each product, and
    attention(qkv, k_cache, v_cache, pos, visible) writes the cache and attends."""
    attn, mlp = block.attn, block.mlp
    qkv = project(attn.c_attn, block.ln_1(x))  # (B, 3C): q, k, v for all heads
    y = attention(qkv, k_cache, v_cache, pos, visible)  # (B, C)
    x = x + project(attn.c_proj, y.to(x.dtype))  # (B, C)
    h = cpu_kernels.gelu(project(mlp.c_fc, block.ln_2(x)))  # (B, 4C): F.gelu, tanh form
    return x + project(mlp.c_proj, h)  # (B, C)


def _write_cache(qkv, k_cache, v_cache, pos) -> torch.Tensor:
    """Store this token's k and v (from qkv (B, 3C)) at slot pos -> q (B, nh, 1, hs)."""
    B, nh, _, hs = k_cache.shape
    q, k, v = qkv.to(k_cache.dtype).view(B, 3, nh, 1, hs).unbind(1)  # 3 x (B, nh, 1, hs)
    k_cache.index_copy_(2, pos, k)  # (B, nh, L, hs): slot pos now holds this token
    v_cache.index_copy_(2, pos, v)
    return q


def _sdpa(qkv, k_cache, v_cache, pos, visible) -> torch.Tensor:
    # Attend over every slot; the mask hides the ones not yet written, so shapes
    # never change (a growing slice would need a new graph per length).
    q = _write_cache(qkv, k_cache, v_cache, pos)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible)  # (B, nh, 1, hs)
    return y.reshape(qkv.size(0), -1)  # (B, C)


def _attend_by_sums(qkv, k_cache, v_cache, pos, visible) -> torch.Tensor:
    """SDPA for one query written as float32 sums -> (B, C)."""
    q = _write_cache(qkv, k_cache, v_cache, pos)
    scores = (q.float() * k_cache.float()).sum(-1) * q.size(-1) ** -0.5  # (B, nh, L)
    if visible is not None:
        scores = scores.masked_fill(~visible.view(1, 1, -1), float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, nh, L)
    y = (p.unsqueeze(-1) * v_cache.float()).sum(-2).to(q.dtype)  # (B, nh, hs)
    return y.reshape(qkv.size(0), -1)  # (B, C)


def _fused(qkv, k_cache, v_cache, pos, visible) -> torch.Tensor:
    """Cache writes and attention in one Triton kernel (slots <= pos; visible must
    say the same, as decode_step's mask does)."""
    return gpu_kernels.decode_attention(qkv.to(k_cache.dtype), k_cache, v_cache, pos)  # (B, C)


_ATTENTION = {"sdpa": _sdpa, "reduce": _attend_by_sums, "fused": _fused}


def _matvec(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for an nn.Linear as a float32 sum of weight * x, rounded to x's dtype;
    other layers (int8, packed) as they are."""
    if type(layer) is not nn.Linear:
        return layer(x)
    y = (x.float().unsqueeze(-2) * layer.weight.float()).sum(-1)  # (B, out)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


def decode_step(
    model: nn.Module,
    k: torch.Tensor,
    v: torch.Tensor,
    token: torch.Tensor,
    pos: torch.Tensor,
    *,
    block_fn: Callable[..., torch.Tensor] = block_step,
    attend_all: bool = False,
) -> torch.Tensor:
    """Feed token (B,) at position pos (1,) -> next-token logits (B, n_vocab).

    k, v (n_layer, B, nh, L, hs): a `KVCache`'s buffers holding positions < pos;
    this token's keys and values are written at slot pos. Every row is at the
    same position (prompts of equal length). block_fn: `block_step`, or a
    compiled version of it. attend_all: k and v end at slot pos (views of the
    filled part of the cache), so every slot is visible and no mask is needed.
    """
    visible = None
    if not attend_all:
        L = k.size(3)
        slots = torch.arange(L, device=pos.device)  # (L,)
        visible = (slots <= pos).view(1, 1, 1, L)  # (1, 1, 1, L)
    x = model.wte(token) + model.wpe(pos)  # (B, C) + (1, C)
    for i, block in enumerate(model.h):
        x = block_fn(block, x, k[i], v[i], pos, visible)  # (B, C)
    x = model.ln_f(x)
    if model.lm_head is not None:  # a quantized or packed copy of wte (gpt2.quantize)
        return model.lm_head(x)
    return matmul_t(x, model.wte.weight)  # (B, n_vocab): the tied LM head, x @ wte.T


def pick_next(
    logits: torch.Tensor,
    noise: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> torch.Tensor:
    """Next-token logits (B, V) -> token ids (B,), with no host synchronisation.

    temperature 0 is greedy (argmax; noise unused). Otherwise the logits go
    through `gpt2.generate`'s temperature, top-k and top-p processors, and the
    token is argmax(p / noise) with noise (B, V) ~ Exp(1): a sample from p.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = apply_temperature(logits.float(), temperature)  # (B, V)
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p, adaptive=False)  # no host read-back
    probs = torch.softmax(logits, dim=-1)  # (B, V); filtered tokens have exactly 0
    return (probs / noise.clamp(min=_TINY)).argmax(dim=-1)  # (B,)


# --------------------------------------------------------------------------- decoders


class StaticDecoder:
    """Greedy or sampled decoding with a fixed-shape step, run eagerly (any device).

    batch_size: rows per call (every call must pass exactly this many, all of the
        same prompt length). max_len: prompt + new tokens the cache holds (at most
        n_ctx); the step attends over all max_len slots, so keep it close to what
        you need. dtype: run in this precision; None keeps the model's. A model in
        another dtype is converted into a copy (the caller's model is not changed);
        a model used as it is is put in evaluation mode (decoding has no dropout).
    compile: pass the per-layer step and the sampler through `torch.compile` with
        `compile_mode` (None: PyTorch's default; "max-autotune-no-cudagraphs" tunes
        the matrix products too, at minutes of compile time). The per-layer step is
        `block_step_one_row` for batch_size 1 on a CUDA device, else `block_step`;
        inductor's coordinate-descent tuning is on while they compile.

    >>> from gpt2.config import GPT2Config
    >>> from gpt2.model import GPT2
    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
    >>> dec = StaticDecoder(model, batch_size=2, max_len=6)
    >>> dec.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=4, seed=0).shape
    torch.Size([2, 6])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        check_model(model)
        n_ctx = model.config.n_ctx
        max_len = n_ctx if max_len is None else max_len
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GPT2Error(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= n_ctx:
            raise GPT2Error(f"max_len must be an integer in [2, {n_ctx}] (the model's context), "
                            f"got {max_len!r}")
        self.model = _in_dtype(model, dtype).eval()
        self.batch_size = batch_size
        self.max_len = max_len
        device = self.model.wte.weight.device
        self.device = device
        B, V = batch_size, self.model.config.n_vocab
        # The static buffers: allocated once, updated in place, never reallocated, so a
        # captured graph can keep pointing at them.
        self.cache = self.model.new_cache(B, max_len)  # k, v: (n_layer, B, nh, L, hs)
        self.token = torch.zeros(B, dtype=torch.long, device=device)  # (B,) the newest token
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) its position
        self.out = torch.zeros(B, max_len, dtype=torch.long, device=device)  # (B, L) all tokens
        self.noise = torch.ones(B, V, dtype=torch.float32, device=device)  # (B, V) Exp(1)
        # The per-layer step and the sampler are what torch.compile fuses: one compiled
        # block_step serves every layer (same shapes, other weights), so compile time
        # does not grow with depth.
        self.block_fn, self.pick_fn = block_step, pick_next
        self.compiled = compile
        if compile:
            options = dict(mode=compile_mode, fullgraph=True, dynamic=False)
            one_row = ONE_ROW_REDUCTIONS and B == 1 and device.type == "cuda"
            self.block_fn = torch.compile(block_step_one_row if one_row else block_step,
                                          **options)
            self.pick_fn = torch.compile(pick_next, **options)

    # -- public -------------------------------------------------------------------------

    def generate(
        self,
        idx: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        vocab_size: int | None = None,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) -> LongTensor (B, T + max_new_tokens).

        temperature 0.0 is greedy; top_k / top_p / vocab_size as in `gpt2.generate`.
        seed: same seed -> same tokens; None draws fresh randomness. The tokens stay
        on the device until the end: no synchronisation per step.
        """
        options = self._options(temperature, top_k, top_p, vocab_size)
        idx = self._check(idx, max_new_tokens)
        for _ in self._decode(idx, max_new_tokens, options, seed):
            pass
        return self.out[:, : idx.size(1) + max_new_tokens].clone()  # (B, T + new)

    def stream(
        self,
        idx: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        vocab_size: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Like `generate`, but yield the new tokens (B,) step by step (for printing
        as they come; reading each one back costs a synchronisation per step).
        The arguments are checked now, before the first token is asked for."""
        options = self._options(temperature, top_k, top_p, vocab_size)
        idx = self._check(idx, max_new_tokens)
        return (self.token.clone() for _ in self._decode(idx, max_new_tokens, options, seed))

    def _options(self, temperature, top_k, top_p, vocab_size) -> SamplingOptions:
        options = SamplingOptions(temperature, top_k, top_p, vocab_size=vocab_size)
        if vocab_size is not None:  # validated, and not past the model's logits
            check_vocab_size(vocab_size, self.model.config.n_vocab)
        return options

    # -- the loop -----------------------------------------------------------------------

    def _decode(self, idx: torch.Tensor, max_new_tokens: int, options: SamplingOptions,
                seed: int | None) -> Iterator[None]:
        """Prefill, then one step per further token; yields after each new token."""
        generator = seeded_generator(seed, self.device)
        sampling = not options.greedy
        # inference_mode per step, not around the yields: the caller's code between
        # steps should run in its own mode
        with torch.inference_mode(), self._compile_config():  # what compiles runs here
            logits = self._prefill(idx)  # (B, V)
            check_finite(logits)
            if sampling:
                self.noise.exponential_(generator=generator)
            self._emit(self._pick(logits, options))
            run = self._runner(options) if max_new_tokens > 1 else None  # after the prefill
        yield
        for _ in range(max_new_tokens - 1):
            with torch.inference_mode():
                if sampling:
                    self.noise.exponential_(generator=generator)  # one kernel, outside any graph
                run()
            yield

    def _compile_config(self) -> contextlib.AbstractContextManager:
        """Inductor's settings for what this decoder compiles: coordinate-descent tuning
        of the generated kernels' launch configurations (TUNE_COMPILED_KERNELS)."""
        if not (self.compiled and TUNE_COMPILED_KERNELS):
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(coordinate_descent_tuning=True)

    def _check(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
            raise GPT2Error("idx must be a 2-D LongTensor (batch, tokens) with at least one token")
        if idx.size(0) != self.batch_size:
            raise GPT2Error(f"this decoder was built for batch_size={self.batch_size}, "
                            f"got {idx.size(0)} rows; build one per batch size")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise GPT2Error(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        T = idx.size(1)
        if T + max_new_tokens > self.max_len:
            raise GPT2Error(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                            f"this decoder's max_len {self.max_len}; build it with a larger "
                            f"max_len (at most n_ctx = {self.model.config.n_ctx})")
        return idx.to(device=self.device, dtype=torch.long)

    def _prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """The prompt through the normal forward, filling the cache -> last logits (B, V).

        Prompts vary in length, so the prefill is not part of the static step.
        """
        T = idx.size(1)
        self.cache.crop(0)  # forget the previous call's positions (buffers are kept)
        logits = self.model(idx, cache=self.cache, last_only=True)  # (B, 1, V)
        self.out[:, :T] = idx
        self.pos.fill_(T - 1)  # the newest token's position; _emit moves it on
        return logits[:, -1]

    def _pick(self, logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
        noise, n = self.noise, options.vocab_size
        if n is not None:  # ids past it are never picked
            logits, noise = logits[:, :n], noise[:, :n]
        return self.pick_fn(logits, noise, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p)

    def _emit(self, token: torch.Tensor) -> None:
        """Make token (B,) the newest: store it at the next position and advance."""
        self.pos.add_(1)
        self.token.copy_(token)
        self.out.index_copy_(1, self.pos, token.unsqueeze(1))  # out[:, pos] = token

    def _step(self, options: SamplingOptions) -> None:
        """The static step: feed self.token at self.pos, emit the next token."""
        logits = decode_step(self.model, self.cache.k, self.cache.v, self.token, self.pos,
                             block_fn=self.block_fn)  # (B, V)
        self._emit(self._pick(logits, options))

    def _runner(self, options: SamplingOptions) -> Callable[[], None]:
        """What runs one step: here the step itself, eagerly."""
        return lambda: self._step(options)


class CudaGraphDecoder(StaticDecoder):
    """`StaticDecoder` whose step is compiled and captured as a CUDA graph.

    The first call with given sampling options compiles the per-layer step
    (torch.compile, `compile_mode`; seconds to a minute), warms it up on a side
    stream and captures one step; every further token is one `graph.replay()`.
    Graphs are kept per (temperature, top_k, top_p) and share one memory pool.
    Raises GPT2Error unless the model is on a CUDA device.

    >>> model = GPT2.from_pretrained("124M", device="cuda")  # doctest: +SKIP
    >>> dec = CudaGraphDecoder(model, batch_size=1, max_len=256)  # doctest: +SKIP
    >>> dec.generate(idx, max_new_tokens=200, temperature=0.0)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = torch.bfloat16,
        compile: bool = True,
        compile_mode: str | None = None,
    ) -> None:
        check_model(model)
        device = model.wte.weight.device
        if device.type != "cuda":
            raise GPT2Error(f"CUDA-graph decoding needs the model on a CUDA GPU, it is on "
                            f"{device}; move it there (--device cuda) or decode without "
                            "CUDA graphs")
        if compile and compile_mode in ("reduce-overhead", "max-autotune"):
            raise GPT2Error(f"compile_mode {compile_mode!r} captures CUDA graphs of its own, "
                            "which cannot nest in this decoder's graph; use "
                            "'max-autotune-no-cudagraphs' or None")
        super().__init__(model, batch_size=batch_size, max_len=max_len, dtype=dtype,
                         compile=compile, compile_mode=compile_mode)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def _runner(self, options: SamplingOptions) -> Callable[[], None]:
        key = (options.temperature, options.top_k, options.top_p)
        if key not in self._graphs:
            self._graphs[key] = self._capture(options)
        return self._graphs[key].replay

    def _capture(self, options: SamplingOptions) -> torch.cuda.CUDAGraph:
        """Warm up (compiles, autotunes) on a side stream, then capture one step.

        Called right after a prefill: the warm-up steps write the cache at slot pos
        and `out` at pos + 1, which the first real step overwrites before anything
        reads them; pos and token are put back after each warm-up step.
        """
        pos, token = self.pos.clone(), self.token.clone()

        def restore() -> None:
            self.pos.copy_(pos)
            self.token.copy_(token)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(options)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(options)  # recorded, not run: pos and token are unchanged
        return graph


def _in_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The model itself when it already is in dtype, else a converted copy. dtype: a
    torch.dtype or a name ("fp32", "bf16", "fp16"), as GPT2.from_pretrained takes."""
    from gpt2.weights import parse_dtype

    dtype = parse_dtype(dtype)
    if dtype is None or model.wte.weight.dtype == dtype:
        return model
    if getattr(model, "quantization", None):
        # its int8 buffers would be cast like float weights, scales lost: refuse
        raise GPT2Error(f"this model is quantized ({model.quantization['method']}); it runs in "
                        "its own precision: pass dtype=None")
    with torch.device("meta"):
        copy = type(model)(model.config)
    state = {k: t.to(dtype) for k, t in model.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    return copy
