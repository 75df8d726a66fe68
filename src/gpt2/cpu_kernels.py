"""gpt2's own CPU kernels for decoding, built on first use.

A decode step multiplies one to a few rows by each weight matrix, and on a CPU its
speed is the rate at which the weights stream from memory. PyTorch's bf16
matrix-vector product and FBGEMM's int8 kernel read the weights at about half the
machine's bandwidth at one to eight rows (bench/CPU_NOTES.md), which holds bf16
and int8 decoding well under the speed their fewer bytes allow. `cpu_kernels.cpp`
holds two kernels that stream at close to the full rate:

  torch.ops.gpt2.bf16_linear(x, weight, bias)    bf16, AVX512-BF16
  torch.ops.gpt2.int8_linear(x, weight, weight_sum, weight_scale, bias)
                                                 int8 x int8, AVX512-VNNI

`gpt2.quantize.PackedBF16Linear` and `Int8Linear` use them for up to
`BF16_MAX_ROWS` / `INT8_MAX_ROWS` rows where `bf16_available()` /
`int8_available()`; more rows (prompts) keep oneDNN's and FBGEMM's kernels, which
are faster there.

The source is compiled once per machine, PyTorch version and compiler, with the
system's C++ compiler (`$CXX`, else `c++`) against PyTorch's stable C ABI, into
`$GPT2_HOME/kernels` (default `~/.cache/gpt2/kernels`); that takes ~2 s. Where
anything is missing -- not an x86 CPU with those instructions, a PyTorch before
2.10, no compiler, a failed build -- the layers run PyTorch's kernels, as they did
before, with one warning saying why if a build was attempted and failed. Set
`GPT2_CPU_KERNELS=0` to turn them off.

    >>> import torch
    >>> if bf16_available():
    ...     w = torch.randn(64, 32).bfloat16()
    ...     x = torch.randn(1, 32).bfloat16()
    ...     y = torch.ops.gpt2.bf16_linear(x, w, None)
    ...     assert torch.allclose(y.float(), x.float() @ w.float().T, rtol=1e-2, atol=1e-2)
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["BF16_MAX_ROWS", "INT8_MAX_ROWS", "bf16_available", "int8_available", "load"]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV = "GPT2_CPU_KERNELS"
# Up to this many rows per call go through these kernels. More rows make a
# matrix-matrix product, where oneDNN's AMX kernel (bf16) and FBGEMM (int8) are as
# fast or faster: measured on the 48 products of a 124M step, bf16 8 rows 10.0-10.4 ms
# against oneDNN's 8.8-9.2; int8 16 rows 10.2-11.3 against FBGEMM's 10.1-11.9, 24 rows
# 16.5-16.7 against 14.4-17.9 (bench/CPU_NOTES.md).
BF16_MAX_ROWS = 8
INT8_MAX_ROWS = 16

_loaded: bool | None = None  # None: not tried yet in this process


def bf16_available() -> bool:
    """True where `torch.ops.gpt2.bf16_linear` can run here (AVX512-BF16 and a build)."""
    return _cpu_has("_is_avx512_bf16_supported") and load()


def int8_available() -> bool:
    """True where `torch.ops.gpt2.int8_linear` can run here (AVX512-VNNI and a build)."""
    return _cpu_has("_is_vnni_supported") and _cpu_has("_is_avx512_supported") and load()


def load() -> bool:
    """Build (once per machine) and load the kernels; False where they cannot be had."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _cpu_has(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


def _load() -> bool:
    if os.environ.get(ENV, "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if _torch_version() < (2, 10):  # the stable C ABI's parallel_for and new_empty
        return False
    if hasattr(torch.ops, "gpt2") and hasattr(torch.ops.gpt2, "bf16_linear"):
        return True  # already registered in this process
    try:
        library = _build()
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gpt2: could not build its CPU kernels ({_first_line(e)}); "
                      f"using PyTorch's, which are slower for decoding. Set {ENV}=0 to "
                      f"silence this.", RuntimeWarning, stacklevel=3)  # fmt: skip
        return False
    return True


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    return cxx


def _command(cxx: str, output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    return [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
            *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(output),
            f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]  # fmt: skip


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
        return library
    folder.mkdir(parents=True, exist_ok=True)
    print("gpt2: building its CPU kernels (once, a few seconds)...", file=sys.stderr)
    # compile to a private name, then rename: another process never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(_command(cxx, Path(tmp)), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or done.stderr.splitlines() or ["compiler failed"])[0])
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
