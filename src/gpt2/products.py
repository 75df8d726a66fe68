"""Which kernel runs each matrix product of the model: x @ W.T, W stored (out, in).

Training, GPUs and large batches call `F.linear` (cuBLAS, oneDNN/MKL). Decoding
on a CPU multiplies one to sixteen rows at a time, where the choice of kernel
decides the speed, because each product must stream its whole weight from
memory for a handful of rows:

    1 row        (W @ x.T).T: MKL's matrix-vector kernel reads W as stored, at the
                 machine's bandwidth
    2-8 rows     gpt2's own fp32 kernel (`gpt2.cpu_kernels`, AVX-512 or AVX2)
    other <= 16  a copy of W that oneDNN reordered once into its blocked layout
                 (MKL's GEMM would re-pack W on every call), when the rows are a
                 batch's new tokens; a short prompt's rows go to MKL (no copy kept)

Layers that are not `nn.Linear` (int8, packed bf16: `gpt2.quantize`) choose their
own kernels; `project` calls them as they are. Measurements: bench/CPU_NOTES.md.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import cpu_kernels

__all__ = ["PACK_WEIGHTS_FOR_CPU_BATCHES", "matmul_t", "project"]


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for an nn.Linear, via `matmul_t`; other layers (int8, packed) as they are."""
    if type(layer) is nn.Linear:
        return matmul_t(x, layer.weight, layer.bias)
    return layer(x)


# Batched decoding on a CPU (2-16 rows per product) runs gpt2's own fp32 kernel for 2-8
# rows on x86 CPUs (gpt2.cpu_kernels). Otherwise it reads the weights from a copy that
# oneDNN has reordered once into its blocked layout: MKL's GEMM would re-pack each weight
# on every call, which halves its speed for few rows (measured here: 10 vs 16-20 GB/s).
# The copy costs as much memory again as the fp32 weights it mirrors; set this to False
# to do without it.
PACK_WEIGHTS_FOR_CPU_BATCHES = True


def matmul_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x @ weight.T + bias, weight stored (out, in) as nn.Linear keeps it.

    For one row on a CPU (decoding) this computes (weight @ x.T).T instead: MKL then
    streams the weight rows as stored (its matrix-vector kernel runs at the machine's
    bandwidth). For 2-8 rows it runs our fp32 kernel (`gpt2.cpu_kernels`, AVX-512/AVX2), and
    for the other rows up to 16 the oneDNN copy of the weight (`_cpu_packed`). Same
    numbers up to rounding either way.
    """
    rows = x.numel() // x.size(-1)
    if x.device.type != "cpu" or rows > 16 or torch.is_grad_enabled() or cpu_kernels.compiling():
        # (torch.compile lowers the product itself, and cannot follow _cpu_packed's cache)
        return F.linear(x, weight, bias)
    fp32 = weight.dtype == x.dtype == torch.float32
    few = cpu_kernels.FP32_MIN_ROWS <= rows <= cpu_kernels.FP32_MAX_ROWS
    ours = cpu_kernels.fp32_op() if few and fp32 else None
    if ours is not None:
        y = ours(x.reshape(rows, x.size(-1)).contiguous(), weight.contiguous(), bias)
        return y.view(*x.shape[:-1], weight.size(0))  # (..., out)
    # the copy is for batches decoding one token a row; a prompt's few tokens (a (B, T, C)
    # input with T > 1) go to MKL, not into a copy of every weight kept from then on
    one_token_a_row = x.dim() == 2 or x.size(-2) == 1
    if rows > 1 and PACK_WEIGHTS_FOR_CPU_BATCHES and fp32 and one_token_a_row:
        packed = _cpu_packed(weight)
        if packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(rows, x.size(-1)), packed, bias, "none", [], ""
            )  # (rows, out)
            return y.view(*x.shape[:-1], weight.size(0))
    xt = x.reshape(rows, x.size(-1)).t()  # (in, rows)
    y = weight @ xt if bias is None else torch.addmm(bias[:, None], weight, xt)  # (out, rows)
    return y.t().reshape(*x.shape[:-1], weight.size(0))  # (..., out)


# id(weight) -> (weak reference to the weight, its stamp when packed, the packed copy);
# an entry goes when its weight is garbage-collected.
_CPU_PACKED: dict[int, tuple] = {}


def _cpu_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-blocked copy of an fp32 weight (out, in), made on first use and kept
    while the weight lives; None where oneDNN cannot make one.

    The copy is remade whenever the weight changes (see `_stamp`).
    """
    try:
        stamp = _stamp(weight)
    except RuntimeError:  # an inference-mode tensor counts no writes: a copy could go stale
        return None
    key = id(weight)
    kept = _CPU_PACKED.get(key)
    alive = kept is not None and kept[0]() is weight
    if alive and _same_stamp(kept[1], stamp):
        return kept[2]
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)  # tuned for 8 rows
    except RuntimeError:
        return None
    if not alive:
        weakref.finalize(weight, _CPU_PACKED.pop, key, None)
    _CPU_PACKED[key] = (weakref.ref(weight), (*stamp[:2], stamp[2].clone()), packed)
    return packed


def _stamp(weight: torch.Tensor) -> tuple:
    """What tells that a weight changed: PyTorch's count of in-place writes (an optimizer
    step, load_state_dict, an edit under torch.no_grad()), its memory (`p.data = t`), and
    16 of its values spread over it, for writes through `p.data`, which PyTorch does not
    count (`p.data.mul_(2)`; a write through `.data` to a few values only can go unseen,
    as it does for autograd: edit weights under torch.no_grad() instead)."""
    flat = weight.detach().reshape(-1)
    return weight._version, weight.data_ptr(), flat[:: max(1, flat.numel() // 16)][:16]


def _same_stamp(kept: tuple, now: tuple) -> bool:
    return kept[:2] == now[:2] and torch.equal(kept[2], now[2])
