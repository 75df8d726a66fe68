"""gpt2's own CPU kernels for decoding (and, on AMX, prompts), built on first use.

A decode step multiplies one to a few rows by each weight matrix, and on a CPU its
speed is the rate at which the weights stream from memory. PyTorch's bf16
matrix-vector product and FBGEMM's int8 kernel read the weights at about half the
machine's bandwidth at one to eight rows (bench/CPU_NOTES.md), which holds bf16
and int8 decoding well under the speed their fewer bytes allow. `cpu_kernels.cpp`
holds kernels that stream at close to the full rate:

  torch.ops.gpt2.bf16_linear_amx / int8_linear_amx   Intel AMX tiles, on a copy
      of the weight laid out for them (`amx_layout`): any prompt
  torch.ops.gpt2.int8wo_linear_amx                   the same for int8 weights x bf16
      rows ("int8-weight-only"): any prompt, 256 rows a call
  torch.ops.gpt2.bf16_linear / int8_linear           AVX512-BF16 / AVX512-VNNI,
      on the plain weight, where the CPU has no AMX: up to 8 rows / any prompt (the
      weight in slices, each through every block of 8 rows while it is in cache)
  torch.ops.gpt2.int8_linear_avx2                    int8 on CPUs with AVX2 but no
      AVX-512 (most laptops): activations quantized to 7 bits, as FBGEMM does there
  torch.ops.gpt2.int8wo_linear                       int8-weight-only on AVX512-BF16,
      where the CPU has no AMX: up to 64 rows (in slices as int8_linear)
  torch.ops.gpt2.fp32_linear / fp32_linear_avx2      fp32 on AVX-512 / AVX2: 2-8 rows,
      for `gpt2.products.matmul_t` (one row is MKL's matrix-vector product, as fast)
  torch.ops.gpt2.argmax_rows / argmax_rows_avx2      greedy decoding's argmax (`argmax`)
  torch.ops.gpt2.gelu_tanh / gelu_tanh_avx2          GPT-2's GELU, fp32 or bf16 / fp32 (`gelu`)

int8 quantizes each row of activations to 8 bits over its own range inside the
call, multiplies, and rescales with the weight's per-channel scales.
`kernel_for_bf16` / `kernel_for_int8` / `kernel_for_int8_weight_only` pick the
kernel for a weight; they are what `gpt2.quantize.PackedBF16Linear` and
`Int8Linear` call. More rows than a kernel's `max_rows` (prompts, on CPUs without
AMX: bf16, int8-weight-only, and int8 on AVX2) run oneDNN's or FBGEMM's
matrix-matrix products.

The source is compiled once per machine, PyTorch version and compiler, with the
system's C++ compiler (`$CXX`, else `c++`) against PyTorch's stable C ABI, into
`$GPT2_HOME/kernels` (default `~/.cache/gpt2/kernels`); that takes ~10 s, and a new
build deletes the builds no process has loaded for 30 days (`STALE_DAYS`). Where
anything is missing -- not an x86 CPU with those instructions, a PyTorch before
2.10, no compiler, a failed build -- the layers run PyTorch's kernels, as they did
before, with one warning saying why if a build was attempted and failed (for bf16
and int8 layers; fp32 falls back quietly). Set `GPT2_CPU_KERNELS=0` to turn them off.

    >>> import torch
    >>> w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    >>> kernel = kernel_for_bf16(w, None)
    >>> if kernel is not None:
    ...     assert torch.allclose(kernel(x).float(), x.float() @ w.float().T, atol=0.1)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from gpt2._io import default_mode

__all__ = ["Kernel", "amx_available", "amx_layout", "argmax", "bf16_available", "fp32_op",
           "from_amx_layout", "gelu", "int8_available", "kernel_for_bf16", "kernel_for_int8",
           "kernel_for_int8_weight_only", "load"]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV = "GPT2_CPU_KERNELS"
# Up to this many rows per call go through these kernels. More rows make a
# matrix-matrix product, where oneDNN (bf16) and FBGEMM (int8) block the work better.
# Measured on the 48 products of a 124M step (bench/CPU_NOTES.md): AVX-512 bf16 at 8
# rows 10.0-10.4 ms against oneDNN's 8.8-9.2. The
# AMX kernels multiply each pair of 16-channel blocks by every block of 16 rows while
# its weights are in cache: int8 beats FBGEMM and widening the weight to bf16 for
# oneDNN at every prompt length measured (256 rows 24 against 55 ms, 1024 rows 132
# against 410), so it takes any prompt GPT-2 has (8 x 1024 rows); so does bf16 (ahead of
# oneDNN's F.linear from 16 rows: 128 rows 25 against 45 ms, 1024 rows 171 against 343).
BF16_MAX_ROWS = 8
# AVX512-VNNI int8 takes any number of rows too: past 8 rows it goes through the weight
# in 128 KB slices, each through every block of 8 rows while it is in cache. On a
# 2-core AMD EPYC (Zen 4, no AMX) it beat FBGEMM at 17-64 rows (124M's shapes:
# 1.0-1.3x; the LM head 1.16x) and widening the weight to bf16 past 64 (128 rows
# 1.45-2.1x, 512 1.4-1.8x), and the layer keeps no FBGEMM copy of its weight.
INT8_MAX_ROWS = 8192
# From this many rows on (prompts), AVX512-VNNI int8 without AMX multiplies through
# oneDNN instead (torch._int_mm, int8 x int8 -> int32, on the weight as stored, transposed
# by a view: no copy), between our kernel's two halves (gpt2::int8_quantize_rows and
# gpt2::int8_rescale), so the result is our kernel's to the bit. bench/CPU_NOTES.md.
INT8_ONEDNN_MIN_ROWS = 64
# ... and weights of this many inputs or more (torch._int_mm summed garbage for one
# input, K = 1, in PyTorch 2.13; weights that narrow gain nothing from it anyway)
INT8_ONEDNN_MIN_INPUTS = 16
AVX2_INT8_MAX_ROWS = 8  # about FBGEMM's (AVX-512) speed at 4-8 rows here, faster at 1-3
# int8 weights x bf16 rows: AVX512-BF16 1.5x _weight_int8pack_mm at 1-8 rows (bound by
# its arithmetic from 4), and, in slices as int8 above, 1.1-2.8x it (to 32 rows) and
# widening the weight to bf16 (to 64) on 124M's shapes on the AMD EPYC; at 128 rows
# 0.8-1.3x, at 512 0.7-1.0x, so more rows than 64 still widen; AMX 1.5-3.2x at 1-8,
# and ahead of widening the weight to bf16 for oneDNN up to 256 rows in one call (59
# against 78 ms; level at 512); more rows go through it 256 at a time (124M prompt of
# 512 tokens 234 against 278 ms, 1024 604 against 708), so the layer needs no plain
# weight beside the tiles
INT8WO_MAX_ROWS = 64
AMX_INT8WO_MAX_ROWS = 256
AMX_BF16_MAX_ROWS = 8192
AMX_INT8_MAX_ROWS = 8192
# fp32 at 2-8 rows: 1.1-1.35x oneDNN's product on its packed copy of the weight, without
# the copy; at 16 rows (two passes over the weight) 10% slower in generate(). One row:
# MKL's matrix-vector product is as fast.
FP32_MIN_ROWS = 2
FP32_MAX_ROWS = 8

_loaded: bool | None = None  # None: not tried yet in this process
_failure: str | None = None  # why the build failed, until a warning has said so
_fp32: Callable | bool | None = None  # fp32_op(): None not asked yet, False none
_argmax: Callable | bool | None = None  # argmax(): None not asked yet, False none
_gelu: dict[torch.dtype, Callable | None] = {}  # gelu(): the op for each dtype, or None


def bf16_available() -> bool:
    """True where `torch.ops.gpt2.bf16_linear` can run here (AVX512-BF16 and a build)."""
    return _cpu_has("_is_avx512_bf16_supported") and load()


def fp32_op() -> Callable | None:
    """The fp32 product for 2-8 rows this CPU runs, op(x, weight, bias?) -> x @ weight.T
    (+ bias): `torch.ops.gpt2.fp32_linear` (AVX-512) or `fp32_linear_avx2`; None where
    neither runs or the kernels cannot be built."""
    global _fp32
    if _fp32 is None:  # asked once per product: remembered
        _fp32 = _avx512_or_avx2("fp32_linear")
    return _fp32 or None


def compiling() -> bool:
    """True while torch.compile traces this code (torch.compiler.is_compiling, PyTorch 2.3+;
    torch._dynamo.is_compiling before it). The compiled code gets PyTorch's ops, which
    inductor fuses: our kernels are for eager CPU inference, and the CPU checks that pick
    them cannot be traced."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:
        from torch._dynamo import is_compiling as check
    return check()


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> each row's index of its largest value (B,), as
    `logits.argmax(dim=-1)` gives it (the first of equal largest values; NaN counts as
    largest). fp32 rows on AVX-512 / AVX2 CPUs go through `torch.ops.gpt2.argmax_rows` /
    `argmax_rows_avx2`: PyTorch's reads a 50,257-wide row at ~0.8 GB/s (AVX-512) or
    ~0.4 (AVX2), 4% of an int8 step at batch 8."""
    global _argmax
    if compiling() or not (logits.dim() == 2 and logits.dtype == torch.float32
                           and logits.device.type == "cpu" and logits.size(1) > 0):
        return logits.argmax(dim=-1)  # (checked first: only these rows build the kernels)
    if _argmax is None:  # asked once per token: remembered
        _argmax = _avx512_or_avx2("argmax_rows")
    if _argmax:
        return _argmax(logits.contiguous())
    return logits.argmax(dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation, `F.gelu(x, approximate="tanh")`. fp32 (AVX-512 or AVX2) and
    bf16 (AVX512-BF16) CPU tensors that autograd does not track go through
    `torch.ops.gpt2.gelu_tanh` (or `gelu_tanh_avx2`): 1.5-4x PyTorch's speed and closer
    to the exact function (it computes x / (1 + exp(-2u)); PyTorch's 1 + tanh(u)
    cancels for negative x, to no correct digits below x = -5.5). Anything else goes
    through F.gelu."""
    if (x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and not compiling()):  # fmt: skip
        if x.dtype not in _gelu:  # asked once per layer and step: remembered
            _gelu[x.dtype] = _gelu_op(x.dtype)
        op = _gelu[x.dtype]
        if op is not None:
            return op(x.contiguous())
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_op(dtype: torch.dtype) -> Callable | None:
    if dtype == torch.float32:
        return _avx512_or_avx2("gelu_tanh") or None
    if dtype == torch.bfloat16 and _cpu_has("_is_avx512_bf16_supported") and load(warn=False):
        return torch.ops.gpt2.gelu_tanh
    return None


def _avx512_or_avx2(name: str) -> Callable | bool:
    """torch.ops.gpt2.<name> on AVX-512 CPUs, <name>_avx2 on AVX2 ones, False elsewhere
    or without the kernels (no warning: these serve fp32 paths that run without them)."""
    if _cpu_has("_is_avx512_supported") and load(warn=False):
        return getattr(torch.ops.gpt2, name)
    if _cpu_has("_is_avx2_supported") and load(warn=False):
        return getattr(torch.ops.gpt2, f"{name}_avx2")
    return False


def int8_available() -> bool:
    """True where `torch.ops.gpt2.int8_linear` can run here (AVX512-VNNI and a build)."""
    return _cpu_has("_is_vnni_supported") and _cpu_has("_is_avx512_supported") and load()


def amx_available() -> bool:
    """True where the AMX kernels can run here (AMX-INT8 and AMX-BF16, the OS allows
    the tiles, and a build)."""
    return _cpu_has("_is_amx_tile_supported") and load() and bool(torch.ops.gpt2.amx_ready())


class Kernel(NamedTuple):
    """One weight's product through one of our kernels: `kernel(x)` for x (rows, in),
    contiguous, rows <= max_rows -> (rows, out)."""

    op: Callable
    args: tuple  # what follows x in the op's arguments
    max_rows: int
    name: str
    amx_group: int = 0  # AMX kernels: the weight is args[0] in amx_layout(w, amx_group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *self.args)


def kernel_for_bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel | None:
    """Our kernel for a bf16 weight (out, in) and bias (out,), or None where none runs."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.is_meta:
        return None
    bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
    out, n_in = weight.shape
    if n_in % 32 == 0 and amx_available():
        packed = amx_layout(weight.detach(), 2)
        return Kernel(torch.ops.gpt2.bf16_linear_amx, (packed, out, bias), AMX_BF16_MAX_ROWS,
                      "AMX", 2)  # fmt: skip
    if bf16_available():
        return Kernel(torch.ops.gpt2.bf16_linear, (weight.detach().contiguous(), bias),
                      BF16_MAX_ROWS, "AVX512-BF16")  # fmt: skip
    return None


def kernel_for_int8(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> Kernel | None:
    """Our kernel for an int8 weight q (out, in) with per-channel scales (out,) and a
    bias (out,): activations quantized per row on the fly. None where none runs."""
    if q.dtype != torch.int8 or q.device.type != "cpu" or q.is_meta:
        return None
    # each channel's weight sum undoes the activations' zero point; fp32 scales and bias
    tail = (_row_sums(q), scale.float().contiguous(),
            None if bias is None else bias.detach().float().contiguous())  # fmt: skip
    if amx_available():
        return Kernel(torch.ops.gpt2.int8_linear_amx, (amx_layout(q, 4), q.shape[0], *tail),
                      AMX_INT8_MAX_ROWS, "AMX", 4)  # fmt: skip
    if int8_available():
        return Kernel(_int8_vnni, (q.contiguous(), *tail), INT8_MAX_ROWS,
                      "AVX512-VNNI")  # fmt: skip
    if _cpu_has("_is_avx2_supported") and load():
        return Kernel(torch.ops.gpt2.int8_linear_avx2, (q.contiguous(), *tail),
                      AVX2_INT8_MAX_ROWS, "AVX2")  # fmt: skip
    return None


def _int8_vnni(x: torch.Tensor, weight: torch.Tensor, weight_sum: torch.Tensor,
               weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gpt2::int8_linear, with oneDNN's product for INT8_ONEDNN_MIN_ROWS rows or more."""
    if x.shape[0] >= INT8_ONEDNN_MIN_ROWS and weight.shape[1] >= INT8_ONEDNN_MIN_INPUTS:
        return _int8_onednn(x, weight, weight_sum, weight_scale, bias)
    return torch.ops.gpt2.int8_linear(x, weight, weight_sum, weight_scale, bias)


def _int8_onednn(x: torch.Tensor, weight: torch.Tensor, weight_sum: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gpt2::int8_linear's two halves around oneDNN's int8 x int8 product."""
    rows = x.shape[0]
    scale = x.new_empty(rows)
    zero = x.new_empty(rows, dtype=torch.int32)
    q = torch.ops.gpt2.int8_quantize_rows(x, scale, zero)  # (rows, in) int8
    sums = torch._int_mm(q, weight.t())  # (rows, out) int32; the weight's transposed view
    torch.ops.gpt2.int8_rescale(sums, scale, zero, weight_sum, weight_scale, bias)
    return sums.view(torch.float32)  # rescaled in place


def _row_sums(q: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Each row's sum of an int8 matrix, in int32, a block of rows at a time: summed
    with dtype=int32 in one call, PyTorch first made an int32 copy of the whole matrix
    (154 MB for 124M's LM head, the peak of loading an int8 model). Small blocks stay
    in malloc's reused heap (4096 rows left the load's peak 35-50 MB higher)."""
    return torch.cat([q[i:i + rows].sum(dim=1, dtype=torch.int32)
                      for i in range(0, q.shape[0], rows)])


def _int8wo_amx_in_chunks(x: torch.Tensor, *args) -> torch.Tensor:
    """torch.ops.gpt2.int8wo_linear_amx for any number of rows: AMX_INT8WO_MAX_ROWS at
    a time past that (the kernel widens each weight slice once per call, and its lead
    over widening the whole weight for oneDNN ends there; in blocks it stays level or
    ahead, and the layer needs no plain copy of its weight: bench/CPU_NOTES.md)."""
    rows = x.size(0)
    if rows <= AMX_INT8WO_MAX_ROWS:
        return torch.ops.gpt2.int8wo_linear_amx(x, *args)
    return torch.cat([torch.ops.gpt2.int8wo_linear_amx(x[i:i + AMX_INT8WO_MAX_ROWS], *args)
                      for i in range(0, rows, AMX_INT8WO_MAX_ROWS)])


def kernel_for_int8_weight_only(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> Kernel | None:
    """Our kernel for an int8 weight q (out, in) with per-channel scales (out,) and a
    bias (out,) times activations rounded to bf16 (the "int8-weight-only" method):
    fp32 rows in, fp32 out. None where none runs."""
    if q.dtype != torch.int8 or q.device.type != "cpu" or q.is_meta:
        return None
    bias = None if bias is None else bias.detach().float().contiguous()
    tail = (scale.float().contiguous(), bias)
    if q.shape[1] % 32 == 0 and amx_available():
        return Kernel(_int8wo_amx_in_chunks, (amx_layout(q, 2), q.shape[0], *tail),
                      AMX_BF16_MAX_ROWS, "AMX", 2)  # fmt: skip
    if bf16_available():
        return Kernel(torch.ops.gpt2.int8wo_linear, (q.contiguous(), *tail), INT8WO_MAX_ROWS,
                      "AVX512-BF16")  # fmt: skip
    return None


def amx_layout(weight: torch.Tensor, group: int) -> torch.Tensor:
    """A weight (out, in) as AMX tiles want it, flat: for each pair of 16-channel blocks
    and each slice of 16 * group inputs, two 16 x 64-byte tiles side by side, each row of
    which holds 16 channels x `group` consecutive inputs (group 4 for int8, 2 for bf16).
    Zero-padded to whole pairs and slices.

    >>> amx_layout(torch.arange(32 * 64, dtype=torch.int32).view(32, 64), 4)[:6].tolist()
    [0, 1, 2, 3, 64, 65]
    """
    out, n_in = weight.shape
    width = 16 * group
    pairs, slices = -(-out // 32), -(-n_in // width)
    w = weight.contiguous()
    if slices * width != n_in or pairs * 32 != out:  # (F.pad copies even to pad nothing)
        w = torch.nn.functional.pad(w, (0, slices * width - n_in, 0, pairs * 32 - out))
    w = w.view(pairs, 2, 16, slices, 16, group)  # (pair, half, channel, slice, k, g)
    return w.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1)  # (pair, slice, half, k, ch, g)


def from_amx_layout(tiles: torch.Tensor, group: int, out: int, n_in: int) -> torch.Tensor:
    """The weight (out, in) that `amx_layout(weight, group)` laid out as `tiles`: a new
    contiguous tensor.

    >>> w = torch.arange(40 * 70, dtype=torch.int32).view(40, 70)
    >>> torch.equal(from_amx_layout(amx_layout(w, 4), 4, 40, 70), w)
    True
    """
    width = 16 * group
    pairs, slices = -(-out // 32), -(-n_in // width)
    w = tiles.view(pairs, slices, 2, 16, 16, group).permute(0, 2, 4, 1, 3, 5)
    return w.reshape(pairs * 32, slices * width)[:out, :n_in].contiguous()


def load(*, warn: bool = True) -> bool:
    """Build (once per machine) and load the kernels; False where they cannot be had.

    If a build was tried and failed, the first call with `warn` says why, once per
    process. `fp32_op` passes warn=False: without the kernels, an fp32 model decodes
    batches a little slower (and with a copy of its weights), and the default fp32
    path should not greet every run without a compiler with a warning.
    """
    global _loaded, _failure
    if _loaded is None:
        _loaded, _failure = _load()
    if warn and _failure is not None:
        warnings.warn(_failure, RuntimeWarning, stacklevel=2)
        _failure = None
    return _loaded


def _cpu_has(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


def _load() -> tuple[bool, str | None]:
    """(loaded, why a build failed or None)."""
    if os.environ.get(ENV, "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, None
    if _torch_version() < (2, 10):  # the stable C ABI's parallel_for and new_empty
        return False, None
    if hasattr(torch.ops, "gpt2") and hasattr(torch.ops.gpt2, "amx_ready"):
        return True, None  # already registered in this process
    try:
        library = _build()
        torch.ops.load_library(str(library))
        _register_shapes()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return False, (f"could not build gpt2's CPU kernels ({_first_line(e)}); using "
                       f"PyTorch's, which are slower for decoding. Set {ENV}=0 to silence "
                       "this.")  # fmt: skip
    return True, None


def _register_shapes() -> None:
    """What each op returns, without running it: torch.compile traces with these."""

    def rows_by(x, out):
        return x.new_empty(x.shape[0], out)

    for name in ("gpt2::bf16_linear", "gpt2::fp32_linear", "gpt2::fp32_linear_avx2"):
        torch.library.register_fake(name)(lambda x, w, b: rows_by(x, w.shape[0]))
    for name in ("gpt2::int8_linear", "gpt2::int8_linear_avx2"):
        torch.library.register_fake(name)(lambda x, w, wsum, s, b: rows_by(x, w.shape[0]))
    torch.library.register_fake("gpt2::int8_quantize_rows")(
        lambda x, scale, zero: torch.empty_like(x, dtype=torch.int8))
    torch.library.register_fake("gpt2::int8_rescale")(lambda acc, s, z, wsum, ws, b: None)
    for name in ("gpt2::argmax_rows", "gpt2::argmax_rows_avx2"):
        torch.library.register_fake(name)(lambda x: x.new_empty(x.shape[0], dtype=torch.long))
    torch.library.register_fake("gpt2::gelu_tanh")(torch.empty_like)
    torch.library.register_fake("gpt2::gelu_tanh_avx2")(torch.empty_like)
    torch.library.register_fake("gpt2::int8wo_linear")(lambda x, w, s, b: rows_by(x, w.shape[0]))
    torch.library.register_fake("gpt2::int8wo_linear_amx")(lambda x, p, out, s, b: rows_by(x, out))
    torch.library.register_fake("gpt2::bf16_linear_amx")(lambda x, p, out, b: rows_by(x, out))
    torch.library.register_fake("gpt2::int8_linear_amx")(
        lambda x, p, out, wsum, s, b: rows_by(x, out))


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    return cxx


def _include_paths() -> list[Path]:
    """torch's C++ headers: what torch.utils.cpp_extension.include_paths() gives for the
    CPU, without importing it (it imports setuptools: 0.2 s on every first forward)."""
    include = Path(torch.__file__).parent / "include"
    return [include, include / "torch" / "csrc" / "api" / "include"]


def _command(cxx: str, output: Path) -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    # no fused multiply-adds the source did not ask for: each kernel rounds its epilogue
    # the same way, whichever path a row count takes
    return [cxx, "-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC",
            "-fvisibility=hidden", *(f"-I{p}" for p in _include_paths()), str(SOURCE),
            "-o", str(output), f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]  # fmt: skip


def _build() -> Path:
    """The compiled library, built now unless this machine already has it."""
    from gpt2.weights.hub import cache_dir

    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             check=True, timeout=60).stdout.splitlines()[0]  # fmt: skip
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), version.encode(),
                    " ".join(_command(cxx, Path("x"))).encode()])  # fmt: skip
    ).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    library = folder / f"gpt2_cpu_kernels-{key}.so"
    if library.exists():
        _mark_used(library)
        return library
    folder.mkdir(parents=True, exist_ok=True)
    print("gpt2: building its CPU kernels (once per machine, ~10 s)...", file=sys.stderr)
    # compile to a private name, then rename: another process never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(_command(cxx, Path(tmp)), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or done.stderr.splitlines() or ["compiler failed"])[0])
        os.chmod(tmp, default_mode(folder=True))  # rwx less the umask (mkstemp made it 0600)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(folder, keep=library)
    return library


# A build not loaded for this long belongs to a PyTorch, compiler or gpt2 no longer in use
# (each has its own key); a build's modification time is refreshed, at most once a day,
# when it is loaded, so another environment sharing the cache keeps the build it uses.
STALE_DAYS = 30


def _mark_used(library: Path) -> None:
    with contextlib.suppress(OSError):  # (a read-only cache still works)
        if time.time() - library.stat().st_mtime > 86400:
            os.utime(library)


def _prune(folder: Path, *, keep: Path) -> None:
    """Delete builds unused for STALE_DAYS, and temporary files of builds that were killed
    over a day ago. A process that has a deleted build loaded keeps its mapping."""
    now = time.time()
    for path in [*folder.glob("gpt2_cpu_kernels-*.so"), *folder.glob(".build-*.so")]:
        age = STALE_DAYS * 86400 if path.name.startswith("gpt2") else 86400
        with contextlib.suppress(OSError):
            if path != keep and now - path.stat().st_mtime > age:
                path.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
