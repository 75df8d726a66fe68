"""Hand-written GPU kernels (Triton), each a PyTorch operator that torch.compile keeps
as one call and a CUDA graph captures like any other kernel. Triton comes with
PyTorch's CUDA builds; the tests run the same kernels on a CPU through Triton's
interpreter (TRITON_INTERPRET=1), against PyTorch's own operators.

decode_attention: the decode step's cache write and attention in one
--------------------------------------------------------------------
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

cross_entropy: the training loss over 50,257 logits a token, in two passes
-------------------------------------------------------------------------
Training's loss reads a (B*T, V) matrix of bf16 logits, 1.6 GB at 16 x 1024
tokens, and its backward writes one as large. Compiled, F.cross_entropy took
1.32 ms forward and 0.99 ms back of a ~33 ms step (124M on an H200);
`cross_entropy` takes 0.62 and 0.92 (bench/GPU_NOTES.md). It reads each row
once going forward and once more going back, one program per row:

    forward   m, s = running max and sum of exp(x - m)     one read, float32
              lse  = m + log(s);   loss = lse - x[target]  lse kept for backward
    backward  dx   = g * (exp(x - lse) - onehot(target))   one read, one write
"""

from __future__ import annotations

import functools
import os

import torch

from gpt2.errors import GPT2Error

__all__ = ["BLOCK_SLOTS", "CE_BACKWARD_NUM_WARPS", "CE_BLOCK", "CE_NUM_WARPS", "NUM_WARPS",
           "available", "cross_entropy", "decode_attention", "runs_on"]

# Slots read per iteration of the kernel's loop, and warps per program. Not tuned
# yet: the kernel is measured against the compiled reductions in bench/gpu_profile.py.
BLOCK_SLOTS = 64
NUM_WARPS = 4
# Logits read per iteration of the cross-entropy kernels' loops, and warps per program
# going forward and back: of six settings on an H200 (1024-8192 x 4-16 warps, both
# kernels timed alone, bench/gpu_profile.py --sections loss) the fastest forward
# (0.62 ms) and the fastest backward (0.86 ms; 0.92 at 8 warps).
CE_BLOCK = 4096
CE_NUM_WARPS = 8
CE_BACKWARD_NUM_WARPS = 16


_triton_found: bool | None = None  # available()'s answer, once asked


@torch.compiler.assume_constant_result  # called, not traced, inside compiled code
def available() -> bool:
    """True where Triton can be imported (PyTorch's CUDA builds bring it)."""
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_found = False
        else:
            _triton_found = True
    return _triton_found


def runs_on(t: torch.Tensor) -> bool:
    """True where these kernels can run on t: Triton is there and t is on a GPU, or
    Triton's interpreter is on (TRITON_INTERPRET=1: CPU tensors, as the tests run)."""
    return available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


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


# --- cross_entropy --------------------------------------------------------------------------


@functools.cache
def _ce_kernels():
    """The cross-entropy kernels (forward, backward), built on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def ce_forward_kernel(logits, targets, loss, lse, row_stride, V, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        row = logits + r.to(tl.int64) * row_stride
        # the running max starts at float32's lowest, not -inf: a first block of -inf
        # logits (a padded head's) then gives exp(0) * 0, not exp(-inf + inf) = NaN
        m = tl.full((), -3.4028234663852886e38, tl.float32)
        total = tl.zeros((), tl.float32)  # running sum of exp(x - m)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        row_lse = m + tl.log(total)
        t = tl.load(targets + r)
        ok = (t >= 0) & (t < V)  # a target out of range reads nothing and gives NaN
        picked = tl.load(row + tl.where(ok, t, 0)).to(tl.float32)
        tl.store(lse + r, row_lse)
        tl.store(loss + r, tl.where(ok, row_lse - picked, float("nan")))

    @triton.jit
    def ce_backward_kernel(logits, targets, lse, grad_loss, grad_lse, grad, row_stride,
                           grad_stride, V, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        row = logits + r.to(tl.int64) * row_stride
        out = grad + r.to(tl.int64) * grad_stride
        g = tl.load(grad_loss + r)
        g_softmax = g + tl.load(grad_lse + r)  # d lse / dx is the softmax too
        row_lse = tl.load(lse + r)
        t = tl.load(targets + r)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(row + cols, mask=ok, other=0.0).to(tl.float32)
            dx = g_softmax * tl.exp(x - row_lse) - tl.where(cols == t, g, 0.0)
            tl.store(out + cols, dx.to(out.dtype.element_ty), mask=ok)

    return ce_forward_kernel, ce_backward_kernel


def _check_rows(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if (logits.dim() != 2 or targets.shape != logits.shape[:1]
            or targets.dtype not in (torch.int64, torch.int32)
            or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        raise GPT2Error(f"cross_entropy: logits {tuple(logits.shape)} {logits.dtype} and "
                        f"targets {tuple(targets.shape)} {targets.dtype} do not fit (N, V) "
                        "float32/bf16/fp16 and (N,) integer")
    if targets.device != logits.device:
        raise GPT2Error(f"cross_entropy: logits on {logits.device} but targets on "
                        f"{targets.device}; move both to one device")
    if not available():
        raise GPT2Error("cross_entropy needs Triton, which PyTorch's CUDA builds bring; "
                        "install one, or use torch.nn.functional.cross_entropy")


def _rows_contiguous(logits: torch.Tensor) -> torch.Tensor:
    """logits with unit column stride (a row stride of its own is fine: a padded head's
    slice is read in place)."""
    return logits if logits.stride(1) == 1 else logits.contiguous()


@torch.library.custom_op("gpt2::cross_entropy", mutates_args=())
def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), lse (N,)), float32: each row's cross-entropy and log-sum-exp."""
    _check_rows(logits, targets)
    logits, targets = _rows_contiguous(logits), targets.contiguous()
    N, V = logits.shape
    loss = logits.new_empty(N, dtype=torch.float32)
    lse = logits.new_empty(N, dtype=torch.float32)
    if N:
        _ce_kernels()[0][(N,)](logits, targets, loss, lse, logits.stride(0), V,
                               BLOCK=CE_BLOCK, num_warps=CE_NUM_WARPS)
    return loss, lse


@_cross_entropy.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.new_empty(logits.size(0), dtype=torch.float32)
    return rows, torch.empty_like(rows)


@torch.library.custom_op("gpt2::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                            grad_loss: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor:
    """d(loss, lse)/d logits given each row's upstream gradients: (N, V) in logits' dtype."""
    logits, targets = _rows_contiguous(logits), targets.contiguous()
    N, V = logits.shape
    grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    if N:
        _ce_kernels()[1][(N,)](logits, targets, lse, grad_loss.float().contiguous(),
                               grad_lse.float().contiguous(), grad, logits.stride(0),
                               grad.stride(0), V, BLOCK=CE_BLOCK,
                               num_warps=CE_BACKWARD_NUM_WARPS)
    return grad


@_cross_entropy_backward.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
      grad_loss: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _ce_setup_context(ctx, inputs, output) -> None:
    logits, targets = inputs
    ctx.save_for_backward(logits, targets, output[1])


def _ce_backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    return _cross_entropy_backward(logits, targets, lse, grad_loss, grad_lse), None


_cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy, -log softmax(logits)[target]: logits (N, V) float32,
    bf16 or fp16 (a row stride of their own is fine), targets (N,) integer -> (N,)
    float32; differentiable in logits, whose gradient comes back in their dtype.

    The same values as `F.cross_entropy(logits.float(), targets, reduction="none")`
    to float32 rounding; sums, exp and log run in float32. Logits at -inf (a padded
    head's) get probability 0. A target outside [0, V) gives NaN (no ignore_index).
    """
    return _cross_entropy(logits, targets)[0]
