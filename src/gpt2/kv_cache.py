"""The key/value cache that makes decoding cost one position per new token.

Attention at position t needs the keys and values of every position <= t. They
do not change once computed, so generation keeps them: each step computes q, k,
v for the new token(s) only, appends k and v here, and attends over everything
stored so far. The buffers are preallocated to the longest sequence the caller
will need, so appending is a copy into place, never a reallocation.

With autograd on (grad enabled and keys that require grad: a forward pass to be
differentiated, e.g. through several cached calls), writing in place would change
what an earlier call's graph saved, and its backward would fail. There each layer's
keys and values so far are kept as tensors of their own, made anew (out of place)
by each call, and the buffers get detached copies.
"""

from __future__ import annotations

import torch

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error


class KVCache:
    """Per-layer key and value buffers of shape (B, n_head, max_len, head_size).

    >>> cache = KVCache(GPT2Config(n_layer=1, n_embd=8, n_head=2), batch_size=1, max_len=4)
    >>> k = v = torch.zeros(1, 2, 3, 4)
    >>> cache.append(0, k, v)[0].shape
    torch.Size([1, 2, 3, 4])
    """

    def __init__(
        self,
        config: GPT2Config,
        *,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GPT2Error(f"KV cache: {name} must be an integer >= 1, got {value!r}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled in every layer (advanced by `advance`)
        # layer -> (k, v) (B, nh, length, hs) with their autograd history, while one is kept
        self._tracked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, nh, T_new, hs) after the cached positions; return all keys and values.

        The returned views cover positions [0, length + T_new) of this layer.
        """
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise GPT2Error(f"KV cache is full: {end} positions > max_len {self.max_len}; "
                            "make it with a larger max_len (at most the model's n_ctx)")
        # (narrow + copy_ rather than slice assignment: the same copy, without Python's
        # index parsing, which costs more than the copy itself for one new position)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hs)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return self._append_tracked(layer, k, v, start, end)
        self._tracked.pop(layer, None)  # (the buffers hold everything again)
        k_all.narrow(2, start, end - start).copy_(k)
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)  # (B, nh, end, hs)

    def _append_tracked(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int,
                        end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """append() where autograd tracks k and v: out of place (see the module)."""
        past = self._tracked.get(layer)
        if past is None:  # the positions before came in without autograd: the buffers'
            past = self.k[layer].narrow(2, 0, start), self.v[layer].narrow(2, 0, start)
        k_new = torch.cat([past[0], k.to(self.k.dtype)], dim=2)  # (B, nh, end, hs)
        v_new = torch.cat([past[1], v.to(self.v.dtype)], dim=2)
        self._tracked[layer] = k_new, v_new
        with torch.no_grad():  # the buffers stay whole for calls without autograd
            self.k[layer].narrow(2, start, end - start).copy_(k)
            self.v[layer].narrow(2, start, end - start).copy_(v)
        return k_new, v_new

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (the model calls this after the last layer)."""
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. when finished samples are dropped)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self._tracked = {layer: (k[rows], v[rows]) for layer, (k, v) in self._tracked.items()}

    def crop(self, length: int) -> None:
        """Forget positions >= length (used to slide a window or retry)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise GPT2Error(f"KV cache: crop takes a length >= 0, got {length!r}")
        self.length = min(self.length, length)
        self._tracked = {layer: (k[:, :, :self.length], v[:, :, :self.length])
                         for layer, (k, v) in self._tracked.items()}
