"""A hand-written GPU kernel for the decode step: cache write and attention in one.

At one new token per row, a layer's attention is little work and many kernels:
write this token's key and value into the cache (two copies), then scores,
softmax and the weighted sum of values (three or four more once torch.compile
has fused what it can; bench/GPU_NOTES.md). `decode_attention` does all of it
in one Triton kernel, one program per (row, head):

    q, k, v  = this head's slices of the row's qkv           (hs,) each
    cache[pos] = k, v                                        the two cache writes
    s_j      = q . key_j / sqrt(hs)   for slots j < pos      the earlier tokens
    s_pos    = q . k / sqrt(hs)                              this token, from registers
    y        = sum_j softmax(s)_j value_j                    online softmax, float32

The keys are read in blocks of BLOCK_SLOTS with a running maximum and sum
(the "online softmax" of flash attention), so the kernel reads each slot once
and never needs the whole score row. This token's key and value are used from
the registers they were loaded into, never read back from the cache the same
program wrote. Only slots < pos are read: the step's cost follows the tokens
so far, not the cache's size.

The kernel is a PyTorch operator (`torch.ops.gpt2.decode_attention`), so
torch.compile keeps it as one call inside a compiled layer and a CUDA graph
captures it like any other kernel. Triton comes with PyTorch's CUDA builds; the
tests run the same kernel on a CPU through Triton's interpreter
(TRITON_INTERPRET=1), against PyTorch's attention.
"""

from __future__ import annotations

import functools

import torch

from gpt2.errors import GPT2Error

__all__ = ["BLOCK_SLOTS", "NUM_WARPS", "available", "decode_attention"]

# Slots read per iteration of the kernel's loop, and warps per program. Not tuned
# yet: the kernel is measured against the compiled reductions in bench/gpu_profile.py.
BLOCK_SLOTS = 64
NUM_WARPS = 4


@functools.cache
def available() -> bool:
    """True where Triton can be imported (PyTorch's CUDA builds bring it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (importing Triton takes a while and
    CPU-only installs do not have it; TRITON_INTERPRET is read here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
        qkv, k_cache, v_cache, pos_ptr, y,
        qkv_row, cache_row, cache_head, cache_slot, y_row,
        scale,
        C: tl.constexpr, HS: tl.constexpr, HS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HS_BLOCK)  # (HS_BLOCK,) one head's features, padded to a power of 2
        d_ok = d < HS
        pos = tl.load(pos_ptr)
        row = qkv + b * qkv_row + h * HS
        q = tl.load(row + d, mask=d_ok, other=0.0).to(tl.float32)
        k_new = tl.load(row + C + d, mask=d_ok, other=0.0)
        v_new = tl.load(row + 2 * C + d, mask=d_ok, other=0.0)
        head = b * cache_row + h * cache_head
        tl.store(k_cache + head + pos * cache_slot + d, k_new, mask=d_ok)
        tl.store(v_cache + head + pos * cache_slot + d, v_new, mask=d_ok)
        # The cache holds k_new in its own dtype: score it as stored, like the earlier keys
        k_new = k_new.to(k_cache.dtype.element_ty).to(tl.float32)
        v_new = v_new.to(v_cache.dtype.element_ty).to(tl.float32)
        m = tl.sum(q * k_new, axis=0) * scale  # running max of the scores: this token's so far
        total = tl.full((), 1.0, tl.float32)  # running sum of exp(s - m)
        acc = v_new  # (HS_BLOCK,) running sum of exp(s - m) * value
        for start in range(0, pos, BLOCK):
            slots = start + tl.arange(0, BLOCK)  # (BLOCK,)
            ok = slots < pos
            offsets = head + slots[:, None] * cache_slot + d[None, :]  # (BLOCK, HS_BLOCK)
            both = ok[:, None] & d_ok[None, :]
            keys = tl.load(k_cache + offsets, mask=both, other=0.0).to(tl.float32)
            s = tl.sum(keys * q[None, :], axis=1) * scale  # (BLOCK,)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shrink = tl.exp(m - m_new)
            p = tl.exp(s - m_new)  # (BLOCK,) 0 where masked
            values = tl.load(v_cache + offsets, mask=both, other=0.0).to(tl.float32)
            total = total * shrink + tl.sum(p, axis=0)
            acc = acc * shrink + tl.sum(p[:, None] * values, axis=0)
            m = m_new
        tl.store(y + b * y_row + h * HS + d, acc / total, mask=d_ok)

    return decode_attention_kernel


@torch.library.custom_op("gpt2::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """Write each row's key and value at slot pos, attend its query over slots <= pos.

    qkv (B, 3C): the attention's input projection for one new token per row (q, k,
    v of every head, in the layout c_attn makes); k_cache, v_cache (B, nh, L, hs):
    this layer's cache, slot pos written in place; pos (1,) long, on the device,
    the same for every row. Returns y (B, C) in qkv's dtype: the heads' outputs
    side by side, as c_proj takes them. Sums and the softmax run in float32.
    """
    B, three_c = qkv.shape
    _, nh, L, hs = k_cache.shape
    C = three_c // 3
    if (three_c != 3 * nh * hs or k_cache.shape != (B, nh, L, hs)
            or v_cache.shape != k_cache.shape or pos.shape != (1,)):
        raise GPT2Error(f"decode_attention: qkv {tuple(qkv.shape)}, caches "
                        f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} and pos "
                        f"{tuple(pos.shape)} do not fit (B, 3C), (B, nh, L, hs), (1,)")
    if not available():
        raise GPT2Error("decode_attention needs Triton, which PyTorch's CUDA builds bring; "
                        "install one, or decode without the fused attention")
    qkv = qkv.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise GPT2Error("decode_attention: the two caches must share a layout whose last "
                        "dimension is contiguous (as KVCache allocates them)")
    y = qkv.new_empty(B, C)
    _kernel()[(B, nh)](
        qkv, k_cache, v_cache, pos, y,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), y.stride(0),
        hs ** -0.5,
        C=C, HS=hs, HS_BLOCK=max(16, 1 << (hs - 1).bit_length()), BLOCK=BLOCK_SLOTS,
        num_warps=NUM_WARPS,
    )
    return y


@decode_attention.register_fake
def _(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      pos: torch.Tensor) -> torch.Tensor:
    return qkv.new_empty(qkv.size(0), qkv.size(1) // 3)
