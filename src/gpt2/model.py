"""GPT-2, top to bottom in the order of the forward pass.

    token ids (B, T)
      -> wte[ids] + wpe[positions]                      token + learned position embeddings
      -> n_layer x Block:                               pre-LayerNorm transformer block
             x = x + attn(ln_1(x))                      causal multi-head self-attention
             x = x + mlp(ln_2(x))                       4x-wide MLP with tanh GELU
      -> ln_f                                           final LayerNorm
      -> x @ wte.T                                      LM head tied to the token embedding
    logits (B, T, n_vocab)

Parameter names follow OpenAI's release (`wte`, `h.0.attn.c_attn`, `ln_f`, ...)
so that checkpoint keys map one to one (see `gpt2.weights.names`). Linear layers
are `nn.Linear`, whose weight is (out, in); OpenAI's and Hugging Face's files
store (in, out), and the loaders transpose them once, in one place.

Every interesting intermediate passes through `self._tap(name, x)`: a no-op
unless `model.hooks(...)` or `model.run_with_cache(...)` is active, in which case
it can record or replace the tensor (see ACTIVATIONS for the names).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import cpu_kernels
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.kv_cache import KVCache
from gpt2.products import matmul_t, project

# Named activations, for `run_with_cache` and `hooks` ({i} is the block index).
ACTIVATIONS = {
    "embed": "token embeddings wte[ids] (B, T, C)",
    "pos_embed": "position embeddings wpe[positions] (1, T, C); (B, T, C) given position_ids",
    "blocks.{i}.resid_pre": "residual stream entering block i (B, T, C)",
    "blocks.{i}.ln1": "ln_1 output, the attention's input (B, T, C)",
    "blocks.{i}.attn.q": "queries per head (B, nh, T, hs)",
    "blocks.{i}.attn.k": "keys per head (B, nh, T, hs)",
    "blocks.{i}.attn.v": "values per head (B, nh, T, hs)",
    "blocks.{i}.attn.pattern": "attention probabilities per head (B, nh, T, T_keys)",
    "blocks.{i}.attn.z": "per-head attention output before c_proj (B, nh, T, hs)",
    "blocks.{i}.attn.out": "attention output after c_proj (B, T, C)",
    "blocks.{i}.resid_mid": "residual stream after the attention (B, T, C)",
    "blocks.{i}.ln2": "ln_2 output, the MLP's input (B, T, C)",
    "blocks.{i}.mlp.pre": "MLP hidden layer before GELU (B, T, 4C)",
    "blocks.{i}.mlp.post": "MLP hidden layer after GELU (B, T, 4C)",
    "blocks.{i}.mlp.out": "MLP output after c_proj (B, T, C)",
    "blocks.{i}.resid_post": "residual stream leaving block i (B, T, C)",
    "ln_final": "ln_f output, just before the unembedding (B, T, C)",
}

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class Taps:
    """What `_tap` does while inspection is active: call hooks, keep requested tensors."""

    def __init__(self, hooks: dict[str, HookFn], keep: set[str]) -> None:
        self.hooks = hooks
        self.keep = keep
        self.cache: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in self.hooks or name in self.keep

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        fn = self.hooks.get(name)
        if fn is not None:
            out = fn(x)
            if out is not None:
                if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                    raise GPT2Error(f"hook on {name} returned {type(out).__name__}"
                                    f"{f' of {out.dtype}' if isinstance(out, torch.Tensor) else ''}"
                                    "; return a float tensor shaped like its input, or None")
                if out.shape != x.shape:
                    raise GPT2Error(
                        f"hook on {name} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                if out.dtype != x.dtype or out.device != x.device:
                    raise GPT2Error(
                        f"hook on {name} returned a {out.dtype} tensor on {out.device}, but "
                        f"its input was {x.dtype} on {x.device}; return the same dtype and "
                        "device (e.g. out.to(z))"
                    )
                x = out
        if name in self.keep:
            self.cache[name] = x.detach()
        return x


def _no_tap(name: str, x: torch.Tensor) -> torch.Tensor:
    return x


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads back together
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # "sdpa": PyTorch's fused kernel. "math": the formula written out, for readers;
        # tests check that both give the same numbers.
        self.impl = "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        tap: Callable[[str, torch.Tensor], torch.Tensor],
        wants: Callable[[str], bool],
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, self.head_size
        name = f"blocks.{self.layer}.attn"
        q, k, v = project(self.c_attn, x).split(C, dim=2)  # 3 x (B, T, C)
        q = tap(f"{name}.q", q.view(B, T, nh, hs).transpose(1, 2))  # (B, nh, T, hs)
        k = tap(f"{name}.k", k.view(B, T, nh, hs).transpose(1, 2))  # (B, nh, T, hs)
        v = tap(f"{name}.v", v.view(B, T, nh, hs).transpose(1, 2))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
            q = q.to(k.dtype)  # (an int8 model's cache is bf16: gpt2.quantize)
        dropout_p = self.dropout if self.training else 0.0

        if self.impl == "math" or wants(f"{name}.pattern"):
            # softmax(q k^T / sqrt(hs) + causal mask) v, written out
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, S)
            if mask is None:
                mask = _causal_mask(T, k.size(2), x.device)
            att = att.masked_fill(~mask, float("-inf"))
            att = tap(f"{name}.pattern", F.softmax(att, dim=-1))  # (B, nh, T, S)
            att = F.dropout(att, dropout_p, self.training)
            y = att @ v  # (B, nh, T, hs)
        elif mask is None and T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new query sees every key
        elif mask is None and k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # new queries after cached keys: is_causal would align the mask top-left
            if mask is None:
                mask = _causal_mask(T, k.size(2), x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = tap(f"{name}.z", y.to(x.dtype))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return _dropout(self.resid_dropout, project(self.c_proj, y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (tanh approximation) -> C."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, tap: Callable[[str, torch.Tensor], torch.Tensor]):
        name = f"blocks.{self.layer}.mlp"
        h = tap(f"{name}.pre", project(self.c_fc, x))  # (B, T, 4C)
        h = tap(f"{name}.post", cpu_kernels.gelu(h))  # (B, T, 4C): F.gelu(h, approximate="tanh")
        return _dropout(self.dropout, project(self.c_proj, h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sublayer reads a normalised copy of the
    residual stream and adds its output back to it."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, layer)

    def forward(self, x, mask, cache, tap, wants) -> torch.Tensor:
        name = f"blocks.{self.layer}"
        x = tap(f"{name}.resid_pre", x)
        a = self.attn(tap(f"{name}.ln1", self.ln_1(x)), mask, cache, tap, wants)
        x = tap(f"{name}.resid_mid", x + tap(f"{name}.attn.out", a))
        m = self.mlp(tap(f"{name}.ln2", self.ln_2(x)), tap)
        return tap(f"{name}.resid_post", x + tap(f"{name}.mlp.out", m))


class GPT2(nn.Module):
    """The GPT-2 language model.

    >>> model = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_ctx=32))
    >>> model(torch.tensor([[464, 3290]])).shape
    torch.Size([1, 2, 50257])
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        # `_weight` skips nn.Embedding's own initialisation (reset_parameters sets every value);
        # on the meta device its normal_ would cost seconds of one-time imports per process
        V, P, C = config.n_vocab, config.n_ctx, config.n_embd
        self.wte = nn.Embedding(V, C, _weight=torch.empty(V, C))  # token embedding + LM head
        self.wpe = nn.Embedding(P, C, _weight=torch.empty(P, C))  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self._taps: Taps | None = None
        # A module replacing the tied head `x @ wte.T` (an int8 or packed-bf16 copy of wte,
        # set by gpt2.quantize); None: the head is wte itself.
        self.lm_head: nn.Module | None = None
        # The KV cache's dtype where it differs from the activations' (bf16 for an int8
        # model on a CPU, set by gpt2.quantize); None: the activations' dtype.
        self.kv_cache_dtype: torch.dtype | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- the forward pass -------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, n_vocab).

        position_ids (B, T): positions of the new tokens (default: after the cache).
        attention_mask (B, S): 1 for real tokens, 0 for padding, over every position
            the attention sees (cached + new); needed only for padded batches.
        cache: a `KVCache` to read past keys/values from and append the new ones to.
        last_only: compute logits for the last position only (B, 1, n_vocab).
        keep_last: compute logits for the last `keep_last` positions only (scoring with a
            stride needs only the new positions; the unembedding is the costliest matmul).
        """
        x = self.features(idx, position_ids=position_ids, attention_mask=attention_mask,
                          cache=cache, last_only=last_only, keep_last=keep_last)
        return self._unembed(x)

    def _unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: features (B, T, C) -> logits (B, T, n_vocab)."""
        if self.lm_head is not None:
            return self.lm_head(x)  # a quantized or packed copy of wte
        return _tied_head(x, self.wte.weight)  # x @ wte.T

    def features(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """What `forward` feeds the LM head: the final layer norm's output (B, T, n_embd).
        The arguments are forward's. The trainer takes its loss from these (see
        `gpt2.train.trainer.ModelLoss`)."""
        if not _integer_matrix(idx):
            raise GPT2Error(f"idx must be token ids: an integer tensor (batch, tokens), got "
                            f"{_described(idx)}")
        bad = _outside(idx, self.config.n_vocab)
        if bad is not None:
            raise GPT2Error(f"token id {bad} is out of range: this model has ids 0 to "
                            f"{self.config.n_vocab - 1}")
        if not isinstance(last_only, bool):
            raise GPT2Error(f"last_only must be True or False, got {last_only!r}")
        if keep_last is not None and (isinstance(keep_last, bool)
                                      or not isinstance(keep_last, int) or keep_last < 1):
            raise GPT2Error(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if idx.dtype not in (torch.int64, torch.int32):  # what the embedding takes
            idx = idx.long()
        if self.training and torch.is_grad_enabled() and self.lm_head is not None \
                and self._packed_for_inference():  # (a tied fp32 head: no module walk)
            raise GPT2Error(
                "this model's projections are packed for inference (int8, or bf16 CPU "
                "kernels): their weights are buffers and gradients do not pass through "
                "them, so it cannot be trained; load it with dtype='fp32' and no quantize "
                "to train it (or call model.eval() to run it)")
        B, T = idx.shape
        if cache is not None and not isinstance(cache, KVCache):
            raise GPT2Error(f"cache must be a KVCache (model.new_cache(batch, ...)), not "
                            f"{type(cache).__name__}")
        if cache is not None and cache.k.size(1) != B:
            raise GPT2Error(f"the KV cache holds {cache.k.size(1)} rows but idx has {B}; make "
                            f"it with model.new_cache({B}, ...)")
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_ctx:
            raise GPT2Error(
                f"input is {past + T} tokens but this model's context is {self.config.n_ctx} "
                "positions; shorten the text (or slide a window over it)"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)
        else:
            self._check_position_ids(position_ids, B, T)
        mask = None
        if attention_mask is not None:
            _check_attention_mask(attention_mask, B)
            mask = _padded_causal_mask(attention_mask.bool(), T, past)  # (B, 1, T, S)

        taps = self._taps
        tap = taps if taps is not None else _no_tap
        wants = taps.wants if taps is not None else _never
        x = tap("embed", self.wte(idx)) + tap("pos_embed", self.wpe(position_ids))  # (B, T, C)
        x = _dropout(self.drop, x)
        for block in self.h:
            x = block(x, mask, cache, tap, wants)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        elif keep_last is not None:
            x = x[:, -keep_last:, :]
        return tap("ln_final", self.ln_f(x))

    def _check_position_ids(self, position_ids, B: int, T: int) -> None:
        """An integer tensor (B or 1, T) of positions in [0, n_ctx), or GPT2Error."""
        if not _integer_matrix(position_ids) or position_ids.size(0) not in (1, B) \
                or position_ids.size(1) != T:
            rows = "1" if B == 1 else f"{B} or 1"
            raise GPT2Error(f"position_ids must be an integer tensor ({rows}, {T}), got "
                            f"{_described(position_ids)}")
        bad = _outside(position_ids, self.config.n_ctx)
        if bad is not None:
            raise GPT2Error(f"position {bad} is out of range: this model has positions 0 to "
                            f"{self.config.n_ctx - 1}")

    def _logits_from_block(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (B, T, n_vocab) for a residual stream x (B, T, C) entering block `start`:
        the rest of an unmasked, uncached forward pass, hooks included. Head ablation
        (`gpt2.inspect.ablate_heads`) reuses the blocks below the one it changes."""
        taps = self._taps
        tap = taps if taps is not None else _no_tap
        wants = taps.wants if taps is not None else _never
        for block in self.h[start:]:
            x = block(x, None, None, tap, wants)
        return self._unembed(tap("ln_final", self.ln_f(x)))

    # -- inspection ---------------------------------------------------------------------

    def activation_names(self) -> list[str]:
        """Every name `hooks` and `run_with_cache` accept, in forward-pass order."""
        names = []
        for pattern in ACTIVATIONS:
            if "{i}" in pattern:
                continue
            names.append(pattern)
        per_block = [p for p in ACTIVATIONS if "{i}" in p]
        blocks = [p.format(i=i) for i in range(self.config.n_layer) for p in per_block]
        return names[:2] + blocks + names[2:]

    @contextlib.contextmanager
    def hooks(self, fns: dict[str, HookFn]) -> Iterator[None]:
        """Run the model with functions that read or replace named activations.

        Each function gets the tensor and returns a replacement of the same shape,
        or None to leave it as it is. The hooks are removed on exit, also after an
        exception. They belong to the model object, not to the thread: while the block
        runs, a forward of this model in another thread runs them too (as
        `run_with_cache` keeps activations of any forward during its call); threads that
        inspect and threads that generate should each have their own copy
        (copy.deepcopy(model)).

        >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=10, n_ctx=4))
        >>> def zero_head_0(z):
        ...     z = z.clone(); z[:, 0] = 0; return z
        >>> with model.hooks({"blocks.0.attn.z": zero_head_0}):
        ...     logits = model(torch.tensor([[1, 2, 3]]))
        """
        if not isinstance(fns, Mapping):
            raise GPT2Error("hooks takes a dict {activation name: function}")
        self._check_names(fns)
        not_callable = [name for name, fn in fns.items() if not callable(fn)]
        if not_callable:
            raise GPT2Error(f"the hook for {not_callable[0]!r} is not a function")
        previous = self._taps
        keep = previous.keep if previous is not None else set()
        self._taps = Taps({**(previous.hooks if previous else {}), **fns}, keep)
        if previous is not None:
            self._taps.cache = previous.cache
        try:
            yield
        finally:
            self._taps = previous

    @torch.no_grad()
    def run_with_cache(
        self, idx: torch.Tensor, *, names: list[str] | None = None, **kwargs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and a dict of named activations (only `names`, or all of them).

        Requesting every activation of a large model on a long text takes a lot of
        memory: name only what you need.
        """
        if isinstance(names, str):
            names = [names]
        if names is not None and not isinstance(names, Iterable):
            raise GPT2Error(f"names must be activation names (a list of str), got {names!r}")
        keep = set(self.activation_names() if names is None else names)
        self._check_names(keep)
        previous = self._taps
        self._taps = Taps(previous.hooks if previous else {}, keep)
        try:
            logits = self(idx, **kwargs)
            return logits, self._taps.cache
        finally:
            self._taps = previous

    def _check_names(self, names) -> None:
        valid = set(self.activation_names())
        for name in names:
            if name not in valid:
                raise GPT2Error(
                    f"no activation named {name!r}; names look like 'blocks.0.attn.pattern' "
                    f"(blocks 0..{self.config.n_layer - 1}; see gpt2.model.ACTIVATIONS)"
                )

    # -- building and loading -----------------------------------------------------------

    def set_attention(self, impl: str) -> None:
        """Switch every attention layer between "sdpa" (fused) and "math" (the formula)."""
        if impl not in ("sdpa", "math"):
            raise GPT2Error(f"attention implementation must be 'sdpa' or 'math', got {impl!r}")
        for block in self.h:
            block.attn.impl = impl

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm gains,
        and residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        variance does not grow with depth."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.zeros_(p)

    def _apply(self, fn, recurse=True):
        """Moves and casts (`.to`, `.half()`, ...), except a cast of a model whose
        projections hold a kernel's copy made for its dtype (int8, or bf16 on a CPU): their
        layers and kernels are chosen when it loads, and a cast half-way broke them."""
        dtype = self.ln_f.weight.dtype
        if fn(torch.empty(0, dtype=dtype)).dtype != dtype and self._packed_for_inference():
            what = ("is quantized" if getattr(self, "quantization", None)
                    else f"runs {str(dtype).removeprefix('torch.')} CPU kernels")
            raise GPT2Error(f"this model {what}, so its dtype is fixed when it loads; load it "
                            "again with GPT2.from_pretrained(path, dtype=...) instead of "
                            "casting it")
        return super()._apply(fn, recurse)

    def _packed_for_inference(self) -> bool:
        from gpt2.quantize import _KernelCopy

        return any(isinstance(m, _KernelCopy) for m in self.modules())

    def num_parameters(self) -> int:
        """Parameter count: every weight and bias once (the LM head is tied to wte). In a
        quantized model the int8 weights are buffers; they count, their scales do not."""
        seen, total = set(), 0
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            # the same memory seen through another tensor object (a bf16 LM head over wte)
            # is the same weight; meta tensors have no memory to compare
            key = id(t) if t.device.type == "meta" else (
                t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
            if key in seen or not name.endswith((".weight", ".bias")):
                continue
            seen.add(key)
            total += t.numel()
        return total

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device, in its activations' dtype or its
        `kv_cache_dtype`."""
        p = self.ln_f.weight  # (wte may hold int8 rows in a quantized model)
        return KVCache(
            self.config,
            batch_size=batch_size,
            max_len=self.config.n_ctx if max_len is None else max_len,
            dtype=self.kv_cache_dtype or p.dtype,
            device=p.device,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        size: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        quantize: str | None = None,
    ) -> GPT2:
        """Load released or trained weights.

        name_or_path: a size name (124M, 355M, 774M, 1558M, gpt2, gpt2-medium, ...) fetched
        by `gpt2 download`, or a path: an OpenAI/Kaggle folder, a Hugging Face folder or
        .safetensors file, or a folder written by `gpt2 train`. `size` picks the size
        folder inside a Kaggle download holding several. dtype: "fp32", "bf16" or "fp16"
        (default: as stored -- fp32 for OpenAI's and the hub's weights -- except on a CPU,
        where fp16 weights, and bf16 ones where the CPU has no native bf16 or `quantize`
        is given, are run in fp32: emulated there, they run slower than fp32, and the
        int8 kernels take fp32 activations; on a CPU, bf16 weights, asked for
        or stored, run packed bf16 matmuls where the CPU has native bf16). quantize="int8": int8
        linear layers, activations quantized per row on the fly on x86 CPUs;
        "int8-weight-only": int8 weights, bf16 activations (see gpt2.quantize). A
        checkpoint written by `gpt2 convert --quantize int8` loads as int8 without being
        quantized again (with "int8" unless quantize says "int8-weight-only").

        >>> model = GPT2.from_pretrained("124M")  # doctest: +SKIP
        """
        return cls._load(name_or_path, size=size, dtype=dtype, device=device,
                         quantize=quantize, fp32_where_emulated=True)

    @classmethod
    def _load(cls, name_or_path, *, size, dtype, device, quantize,
              fp32_where_emulated: bool) -> GPT2:
        """from_pretrained; fp32_where_emulated=False keeps half-precision weights as
        stored on any CPU (`gpt2 validate`, which reports the checkpoint as it is)."""
        from gpt2 import quantize as q
        from gpt2.commands._common import resolve_device
        from gpt2.weights import load_checkpoint, mapping
        from gpt2.weights.hub import resolve_model

        device = resolve_device(device)  # before the slow part: reading the weights
        if quantize is not None and quantize not in q.METHODS:
            raise GPT2Error(
                f"unknown quantization {quantize!r}; choose one of {', '.join(q.METHODS)}"
            )
        path = resolve_model(str(name_or_path))
        if q.quantization_info(path) is not None:
            from gpt2.weights import parse_dtype

            if parse_dtype(dtype) is not None:
                raise GPT2Error(f"{path} is an int8 checkpoint, which runs in its own "
                                f"precision: dtype {dtype!r} (--dtype) does not apply; leave "
                                "it out")
            model = q.load_quantized(path, device=device, method=quantize or "int8").eval()
            mapping.trim_heap()
            return model
        ckpt = load_checkpoint(path, size=size, dtype=dtype)
        with torch.device("meta"):
            model = cls(ckpt.config)
        model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
        # layout, path: shown by `gpt2 validate`; not the tensors, which a cast, a move to
        # a GPU or quantizing replaces (holding them kept a second copy of the weights)
        model.source = dataclasses.replace(ckpt, state_dict={})
        del ckpt  # the model holds the tensors now: what it replaces is freed at once
        model = model.to(device).eval()
        stored = model.ln_f.weight.dtype
        if dtype is None and fp32_where_emulated and torch.device(device).type == "cpu" and (
                stored == torch.float16 or stored == torch.bfloat16 and (
                    quantize is not None or not q.cpu_supports_bf16())):
            # half precision as stored, but emulated here: slower; or int8 layers, whose
            # CPU kernels take fp32 rows (the int8 weights are the same either way)
            model = model.float()
        if quantize is not None:
            float_wte = model.wte.weight
            model = q.quantize_model(model, quantize)
            if model.wte.weight.data_ptr() != float_wte.data_ptr() and float_wte.is_cpu:
                # the float table is read no more (the int8 head's rows replace it); as
                # pages of the mapped file, it would stay resident while the mapping
                # lives (its small tensors keep it): 154 MB for 124M
                mapping.hand_back(float_wte.data_ptr(), float_wte.nbytes)
            del float_wte
        elif torch.device(device).type == "cpu" and model.ln_f.weight.dtype == torch.bfloat16 \
                and (dtype is not None or q.cpu_supports_bf16()):
            # asked for bf16, or a bf16 checkpoint loaded as stored: the packed bf16
            # layers (plain bf16 F.linear ran at fp32's speed: 40 vs 66 tokens/s, 124M)
            model = q.prepare_bf16(model)
        mapping.trim_heap()  # what packing and casting freed
        return model

    def save_pretrained(self, folder: str | os.PathLike, *, tokenizer=None,
                        dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the model as a folder that `GPT2.from_pretrained` (and, unless it is
        quantized, transformers' `GPT2LMHeadModel.from_pretrained`) loads: config.json
        and model.safetensors in Hugging Face's layout, the vocabulary files too when a
        `tokenizer` is given. dtype: "fp32", "bf16" or "fp16" (default: as the model
        holds its weights); a quantized model is written as its int8 checkpoint, in its
        own precision. The folder is written beside `folder` and renamed into place; an
        existing one that is not empty is replaced only with `overwrite`. -> the folder

        >>> model.save_pretrained("my-gpt2", tokenizer=tok)  # doctest: +SKIP
        """
        from gpt2 import quantize as q
        from gpt2.weights import parse_dtype
        from gpt2.weights.huggingface import save_huggingface

        if not isinstance(folder, (str, os.PathLike)) or str(folder) == "":
            raise GPT2Error(f"save_pretrained: folder must be a path, got {folder!r}")
        if getattr(self, "quantization", None):
            if parse_dtype(dtype) is not None:
                raise GPT2Error(f"save_pretrained: this model is quantized and is written in "
                                f"its own precision; dtype {dtype!r} does not apply")
            return q.save_quantized(self, folder, tokenizer=tokenizer, overwrite=overwrite)
        return save_huggingface(self.state_dict(), self.config, folder, tokenizer=tokenizer,
                                dtype=parse_dtype(dtype), overwrite=overwrite)

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
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
        """Continue each row of idx (B, T) by max_new_tokens tokens -> (B, T + new).

        temperature=0.0 is greedy; `gpt2.generate.generate` documents every option.

        >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8))
        >>> model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, top_k=4, seed=0).shape
        torch.Size([1, 5])
        """
        from gpt2.generate import generate

        return generate(self, idx, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        stop_tokens=stop_tokens, seed=seed, attention_mask=attention_mask,
                        sliding_window=sliding_window, vocab_size=vocab_size)


# Training on a GPU multiplies by a copy of wte padded to a multiple of 64 rows:
# 50,257 logits per row leave the (B*T, V) bf16 matrices unaligned, which keeps
# cuBLAS off its fastest tensor-core kernels. The padded logits are sliced off.
PAD_HEAD_FOR_GPU_TRAINING = True


def _tied_head(x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
    """x (..., C) @ wte.T -> logits (..., V), through `_padded_head` when training on a GPU."""
    if PAD_HEAD_FOR_GPU_TRAINING and x.is_cuda and torch.is_grad_enabled():
        return _padded_head(x, wte, 64)
    return matmul_t(x, wte)


def _padded_head(x: torch.Tensor, wte: torch.Tensor, multiple: int) -> torch.Tensor:
    """x @ wte.T with wte padded by zero rows to a multiple of `multiple`; the extra
    logits are sliced off, so the result is a view with row stride V + pad."""
    V = wte.size(0)
    pad = -V % multiple
    if pad == 0:
        return F.linear(x, wte)
    return F.linear(x, F.pad(wte, (0, 0, 0, pad)))[..., :V]  # (..., V)


def full_width_head(x: torch.Tensor, wte: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x @ wte.T over wte padded by zero rows to a multiple of `multiple`, the extra
    logits held at -inf by the product's bias: (..., V + pad), contiguous rows.

    For a loss: softmax gives the extra columns probability exp(-inf) = 0, so the loss
    and its gradients are those of the V real logits, while the softmax reads aligned
    rows of V + pad instead of a strided slice of V (H200, 124M, batch 16 x 1024,
    compiled: 447K -> 465-469K tokens/s; bench/GPU_NOTES.md).
    """
    V = wte.size(0)
    pad = -V % multiple
    if pad == 0:
        return F.linear(x, wte)
    bias = F.pad(torch.zeros(V, dtype=wte.dtype, device=wte.device), (0, pad),
                 value=float("-inf"))
    return F.linear(x, F.pad(wte, (0, 0, 0, pad)), bias)  # (..., V + pad)


def check_model(model) -> None:
    """GPT2Error unless `model` is a GPT-2 of ours: a GPT2, or a wrapper that passes its
    attributes through (torch.compile's). Generate, score and inspect call it first, so
    another module is one clear error rather than an AttributeError from inside them."""
    if not isinstance(getattr(model, "config", None), GPT2Config):
        raise GPT2Error(f"expected a gpt2.GPT2 model (GPT2.from_pretrained(...)), got "
                        f"{type(model).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in evaluation mode (no dropout: the same input gives the same numbers)
    for the block, then back in the mode it was in, also after an exception: for
    generating, scoring and inspecting in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """drop(x), skipped where it would return x anyway (evaluation, or p = 0): a decode
    step would otherwise spend some 25 module calls on doing nothing."""
    return drop(x) if drop.training and drop.p > 0 else x


def _never(name: str) -> bool:
    return False


def _causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) booleans: query i (at absolute position S - T + i) may see keys j <= it."""
    past = S - T
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)


def _integer_matrix(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype != torch.bool
            and not t.is_floating_point() and not t.is_complex())


def _described(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) \
        else type(t).__name__


def _outside(t: torch.Tensor, n: int) -> int | None:
    """A value of t outside [0, n), or None. Checked on a CPU only: on a GPU the check
    would wait for the device (and an index out of range stops its kernel there)."""
    if t.device.type != "cpu" or not t.numel() or torch.compiler.is_compiling():
        return None
    low, high = (int(v) for v in torch.aminmax(t))
    return low if low < 0 else high if high >= n else None


def _check_attention_mask(mask, B: int) -> None:
    """A tensor (B, S) of 1 (a token) and 0 (padding), or GPT2Error (0.5 or 2 read as 1)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.size(0) != B:
        got = (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise GPT2Error(f"attention_mask must be a tensor ({B}, positions) of 1 and 0, got {got}")
    if mask.dtype != torch.bool and mask.device.type == "cpu" \
            and not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
        raise GPT2Error("attention_mask must hold only 1 (a token) and 0 (padding)")


def _padded_causal_mask(key_valid: torch.Tensor, T: int, past: int) -> torch.Tensor:
    """Causal mask that also hides padding keys: (B, S) validity -> (B, 1, T, S).

    Every query may still see itself, so a padding position (whose output nobody
    reads) never has an all-masked row, which would make softmax return NaN.
    """
    S = key_valid.size(1)
    if S != past + T:
        raise GPT2Error(f"attention_mask covers {S} positions, expected {past + T}")
    causal = _causal_mask(T, S, key_valid.device)  # (T, S)
    self_key = torch.eye(T, S, dtype=torch.bool, device=key_valid.device).roll(past, dims=1)
    allowed = (causal & key_valid[:, None, :]) | self_key  # (B, T, S)
    return allowed.unsqueeze(1)  # (B, 1, T, S)
