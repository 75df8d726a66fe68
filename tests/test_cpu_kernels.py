"""gpt2's own CPU kernels (gpt2/cpu_kernels.cpp) against products computed in float64.

Oracle: the same numbers multiplied in float64 by PyTorch (`x.double() @ w.double().T`),
with the error each kernel's rounding may add written out: bf16 output rounding for
`bf16_linear`, half a step of each row's 8-bit grid for `int8_linear`, fp32 sums for
`fp32_linear`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2 import cpu_kernels
from gpt2.quantize import Int8Linear, PackedBF16Linear, quantize_weight_int8

HAS_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
HAS_VNNI = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()) and bool(
    getattr(torch.cpu, "_is_avx512_supported", lambda: False)()
)
HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
HAS_AVX2 = bool(getattr(torch.cpu, "_is_avx2_supported", lambda: False)())
HAS_AVX512 = bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)())
CAN_BUILD = (
    shutil.which("c++") is not None
    and tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10)
    and os.environ.get(cpu_kernels.ENV, "1") != "0"
)
needs_amx = pytest.mark.skipif(not (HAS_AMX and CAN_BUILD),
                               reason="no AMX, compiler or PyTorch >= 2.10")  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def built():
    """The kernels, built and loaded (the parameters below call torch.ops.gpt2 directly)."""
    cpu_kernels.load()


def test_kernels_build_wherever_they_can_run():
    """No silent fallback: on a CPU with the instructions, a compiler and PyTorch >= 2.10,
    the kernels must build and load (else every test below would quietly test nothing)."""
    if not ((HAS_BF16 or HAS_VNNI) and CAN_BUILD):
        pytest.skip("this machine cannot run the kernels")
    assert cpu_kernels.load()
    assert cpu_kernels.bf16_available() == HAS_BF16
    assert cpu_kernels.int8_available() == HAS_VNNI
    assert cpu_kernels.amx_available() == HAS_AMX  # (where Linux allows the tiles)


def test_the_build_uses_the_headers_cpp_extension_names():
    """The include paths are spelled out (importing cpp_extension pulls in setuptools,
    0.2 s on the first forward of every process); they must stay what it would give."""
    from torch.utils.cpp_extension import include_paths

    assert [str(p) for p in cpu_kernels._include_paths()] == include_paths()


def test_loading_built_kernels_imports_no_build_tools():
    """Where the kernels are already built, a process loads them without importing
    torch.utils.cpp_extension or setuptools."""
    if not CAN_BUILD:
        pytest.skip("cannot build here")
    code = ("import sys; from gpt2 import cpu_kernels; ok = cpu_kernels.load(); "
            "print(ok, 'setuptools' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, check=True)
    assert done.stdout.split() == ["True", "False", "False"]


def test_a_new_build_deletes_builds_unused_for_30_days(tmp_path, monkeypatch):
    """Each PyTorch, compiler and source has its own build; a new one deletes those not
    loaded for STALE_DAYS and killed builds' temporary files, and loading one marks it used.
    (The compiler is stood in for by a command that writes the file.)"""
    monkeypatch.setenv("GPT2_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: sys.executable)  # `--version` works
    monkeypatch.setattr(cpu_kernels, "_command", lambda cxx, out: [
        sys.executable, "-c", f"open({str(out)!r}, 'wb').write(b'so')"])
    folder = tmp_path / "kernels"
    folder.mkdir()
    day = 86400
    now = time.time()
    ages = {"gpt2_cpu_kernels-0000000000000000.so": 31 * day,  # stale
            "gpt2_cpu_kernels-1111111111111111.so": 29 * day,  # used this month
            ".build-killed.so": 2 * day, ".build-running.so": 60, "notes.txt": 99 * day}
    for name, age in ages.items():
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (now - age, now - age))
    library = cpu_kernels._build()
    assert library.read_bytes() == b"so"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        library.name, "gpt2_cpu_kernels-1111111111111111.so", ".build-running.so", "notes.txt"])
    os.utime(library, (now - 3 * day, now - 3 * day))
    assert cpu_kernels._build() == library  # loaded again, not rebuilt: marked as used
    assert now - library.stat().st_mtime < day


# -- bf16 ----------------------------------------------------------------------------------


def bf16_reference(x, w, b):
    ref = x.double() @ w.double().T
    return ref if b is None else ref + b.double()


def amx_bf16(x, w, b):
    return torch.ops.gpt2.bf16_linear_amx(x, cpu_kernels.amx_layout(w, 2), w.shape[0], b)


def amx_int8(x, q, wsum, scale, b):
    return torch.ops.gpt2.int8_linear_amx(x, cpu_kernels.amx_layout(q, 4), q.shape[0], wsum,
                                          scale, b)  # fmt: skip


def kernels(avx512, amx, avx512_ok):
    """The kernels of one kind this machine runs, as test parameters."""
    found = []
    if avx512_ok and CAN_BUILD:
        found.append(pytest.param(avx512, id="avx512"))
    if HAS_AMX and CAN_BUILD:
        found.append(pytest.param(amx, id="amx"))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no such kernel here"))]


BF16_KERNELS = kernels(lambda *args: torch.ops.gpt2.bf16_linear(*args), amx_bf16, HAS_BF16)
def avx2_int8(*args):
    return torch.ops.gpt2.int8_linear_avx2(*args)


def onednn_int8(x, q, wsum, scale, b):
    """int8_linear's two halves around oneDNN's int8 x int8 product, whatever the rows
    (the layers take this way for INT8_ONEDNN_MIN_ROWS rows or more on AVX512-VNNI, and
    16 inputs or more: PyTorch's product is wrong for one, K = 1)."""
    if q.shape[1] < cpu_kernels.INT8_ONEDNN_MIN_INPUTS:
        return torch.ops.gpt2.int8_linear(x, q, wsum, scale, b)
    return cpu_kernels._int8_onednn(x, q, wsum, scale, b)


INT8_KERNELS = kernels(lambda *args: torch.ops.gpt2.int8_linear(*args), amx_int8, HAS_VNNI)
if HAS_VNNI and CAN_BUILD:
    INT8_KERNELS.append(pytest.param(onednn_int8, id="onednn"))
if HAS_AVX2 and CAN_BUILD:
    INT8_KERNELS.append(pytest.param(avx2_int8, id="avx2"))


def amx_int8wo(x, q, scale, b):
    return torch.ops.gpt2.int8wo_linear_amx(x, cpu_kernels.amx_layout(q, 2), q.shape[0], scale, b)


INT8WO_KERNELS = kernels(lambda *args: torch.ops.gpt2.int8wo_linear(*args), amx_int8wo, HAS_BF16)


@pytest.mark.parametrize("kernel", BF16_KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 32, 50])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (37, 96), (5, 1600)])
def test_bf16_linear_is_the_float64_product_rounded_to_bf16(rows, n_out, n_in, kernel):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = (torch.randn(n_out, n_in, generator=gen) * 0.05).bfloat16()
    for b in (None, torch.randn(n_out, generator=gen).bfloat16()):
        y = kernel(x, w, b)
        assert y.shape == (rows, n_out) and y.dtype == torch.bfloat16
        ref = bf16_reference(x, w, b)
        # bf16 rounding of the result (2^-9 relative) plus fp32 sums (n_in terms)
        bound = 2**-8 * ref.abs() + 1e-6 * n_in * (x.double().abs() @ w.double().abs().T)
        assert ((y.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("kernel", BF16_KERNELS)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), n_in=st.integers(1, 130), n_out=st.integers(1, 70),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_bf16_linear_any_shape(kernel, rows, n_in, n_out, seed):
    if kernel is amx_bf16:
        n_in = 32 * -(-n_in // 32)  # the AMX kernel reads whole 32-wide slices of x
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = torch.randn(n_out, n_in, generator=gen).bfloat16()
    b = torch.randn(n_out, generator=gen).bfloat16()
    y = kernel(x, w, b)
    ref = bf16_reference(x, w, b)
    bound = 2**-8 * ref.abs() + 1e-6 * n_in * (x.double().abs() @ w.double().abs().T + 1)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("kernel", BF16_KERNELS)
def test_bf16_kernels_reject_wrong_inputs_with_a_message(kernel):
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="width|does not fit"):
        kernel(torch.randn(1, 64).bfloat16(), w[:, :16].contiguous(), None)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(1, 32), w, None)  # fp32 rows
    with pytest.raises(RuntimeError, match="one per output"):
        kernel(torch.randn(1, 32).bfloat16(), w, torch.zeros(7).bfloat16())


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_int8_kernels_reject_wrong_inputs_with_a_message(kernel):
    q = torch.ones(8, 32, dtype=torch.int8)
    wsum, scale = q.sum(dim=1, dtype=torch.int32), torch.ones(8)
    # (oneDNN's product says it of the two halves: "needs to match")
    with pytest.raises(RuntimeError, match="width|does not fit|needs to match"):
        kernel(torch.randn(1, 16), q, wsum, scale, None) if kernel is not amx_int8 else \
            torch.ops.gpt2.int8_linear_amx(torch.randn(1, 100), cpu_kernels.amx_layout(q, 4), 8,
                                           wsum, scale, None)  # fmt: skip
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(1, 32).bfloat16(), q, wsum, scale, None)
    with pytest.raises(RuntimeError, match="one per output"):
        kernel(torch.randn(1, 32), q, wsum[:7], scale, None)


# -- fp32 ----------------------------------------------------------------------------------

def gpt2_op(name):
    """torch.ops.gpt2.<name>, looked up when called (the kernels load in a fixture)."""
    return lambda *args: getattr(torch.ops.gpt2, name)(*args)


def avx512_and_avx2(name):
    """torch.ops.gpt2.<name> and <name>_avx2, those this machine runs, as test parameters."""
    return [
        pytest.param(gpt2_op(op), id=op)
        for op, runs in ((name, HAS_AVX512), (f"{name}_avx2", HAS_AVX2))
        if runs and CAN_BUILD
    ] or [pytest.param(None, marks=pytest.mark.skip(reason="no such kernel here"))]


FP32_KERNELS = avx512_and_avx2("fp32_linear")


def fp32_check(kernel, x, w, b):
    y = kernel(x, w, b)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == torch.float32
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    # fp32 sums in any order: at most (terms + 1) units of 2^-24 of the sum of |terms|
    size = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    err = (y.double() - ref).abs()
    assert (err <= (x.shape[1] + 2) * 2**-24 * size + 1e-38).all(), (err / size).max()
    return err


@pytest.mark.parametrize("kernel", FP32_KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 17])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (37, 100), (5, 1600)])
def test_fp32_linear_is_the_float64_product_to_fp32_rounding(rows, n_out, n_in, kernel):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, n_in, generator=gen)
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    for b in (None, torch.randn(n_out, generator=gen)):
        err = fp32_check(kernel, x, w, b)
        # and as close as PyTorch's own fp32 product (MKL), not merely within the bound
        theirs = (F.linear(x, w, b).double() - (x.double() @ w.double().T
                                                + (0 if b is None else b.double()))).abs()
        assert err.max() <= 4 * theirs.max() + 1e-6


@pytest.mark.parametrize("kernel", FP32_KERNELS)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), n_in=st.integers(1, 130), n_out=st.integers(1, 70),
       bias=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_fp32_linear_any_shape(kernel, rows, n_in, n_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=gen) * 10
    w = torch.randn(n_out, n_in, generator=gen)
    fp32_check(kernel, x, w, torch.randn(n_out, generator=gen) if bias else None)


@pytest.mark.parametrize("kernel", FP32_KERNELS)
def test_fp32_kernels_reject_wrong_inputs_with_a_message(kernel):
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="widths differ"):
        kernel(torch.randn(1, 64), w, None)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(1, 32).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(32, 2).t(), w, None)
    with pytest.raises(RuntimeError, match="one per output"):
        kernel(torch.randn(1, 32), w, torch.zeros(7))


@pytest.mark.parametrize("kernel", FP32_KERNELS)
def test_fp32_products_of_2_to_8_rows_run_our_kernel(kernel, monkeypatch):
    """`gpt2.products.matmul_t` (every nn.Linear and the tied head while decoding on a CPU):
    our kernel for 2-8 rows, MKL for one, oneDNN's packed copy for 9-16; each within
    fp32 rounding of the float64 product."""
    import gpt2.products

    calls = []

    def counting(x, w, b):
        calls.append(x.shape[0])
        return kernel(x, w, b)

    monkeypatch.setattr(cpu_kernels, "fp32_op", lambda: counting)
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    with torch.no_grad():
        for rows in (1, 2, 5, 8, 9, 16):
            x = torch.randn(rows, 1, 64, generator=gen)
            y = gpt2.products.matmul_t(x, w, b)
            ref = x.double() @ w.double().T + b.double()
            size = x.double().abs() @ w.double().abs().T + b.double().abs()
            # fp32 sums in any order (MKL, ours, oneDNN): as in fp32_check
            assert y.shape == (rows, 1, 96) and ((y - ref).abs() <= 66 * 2**-24 * size).all()
        if torch.backends.mkldnn.is_available():
            assert id(w) in gpt2.products._CPU_PACKED  # 9 and 16 rows
    assert calls == [2, 5, 8]
    product = gpt2.products.matmul_t
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous: copied, same result
    with torch.no_grad():
        assert torch.equal(product(x, w, b), product(x.contiguous(), w, b))
    with torch.enable_grad():  # training: autograd's products, not ours
        product(torch.randn(4, 64), w.requires_grad_(), b)
    assert calls == [2, 5, 8, 5, 5]


def test_fp32_op_is_the_best_kernel_this_cpu_runs():
    op = cpu_kernels.fp32_op()
    if not CAN_BUILD or not (HAS_AVX512 or HAS_AVX2):
        assert op is None
    else:
        assert op is (torch.ops.gpt2.fp32_linear if HAS_AVX512 else torch.ops.gpt2.fp32_linear_avx2)


# -- greedy argmax -------------------------------------------------------------------------

needs_avx512 = pytest.mark.skipif(not (HAS_AVX512 and CAN_BUILD),
                                  reason="no AVX-512, compiler or PyTorch >= 2.10")  # fmt: skip
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 3e38, -3e38, 1e-45]


ARGMAX_KERNELS = avx512_and_avx2("argmax_rows")


@pytest.mark.parametrize("kernel", ARGMAX_KERNELS)
@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 9), n=st.integers(1, 100), seed=st.integers(0, 2**16),
       ties=st.booleans(), specials=st.integers(0, 6), all_inf=st.booleans())  # fmt: skip
def test_argmax_rows_is_torch_argmax(kernel, rows, n, seed, ties, specials, all_inf):
    """The first index of the largest value, NaN counting as largest, -0.0 equal to 0.0:
    exactly torch.argmax, ties, infinities and NaN included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen)
    if ties:  # few distinct values: many equal maxima
        x = x.mul(2).round()
    for _ in range(specials):
        r, i, k = (int(torch.randint(m, (1,), generator=gen)) for m in (rows, n, len(SPECIAL)))
        x[r, i] = SPECIAL[k]
    if all_inf:  # a row of -inf (its argmax is 0), perhaps with one special in it
        x[0] = torch.where(x[0].isnan() | (x[0] == float("inf")), x[0], -float("inf"))
    assert torch.equal(kernel(x), x.argmax(dim=-1))


@pytest.mark.parametrize("kernel", ARGMAX_KERNELS)
@pytest.mark.parametrize("at", [0, 1, 7, 8, 15, 16, 50239, 50255, 50256])
def test_argmax_rows_of_vocabulary_width(kernel, at):
    x = torch.randn(3, 50257, generator=torch.Generator().manual_seed(at))
    x[0, at] = 100.0
    x[1, at] = x[1, -1] = x[1, 7] = 100.0  # three equal maxima: the first wins
    x[2] = -float("inf")
    assert torch.equal(kernel(x), x.argmax(dim=-1))
    assert kernel(x)[0] == at


def test_greedy_argmax_takes_any_logits():
    """gpt2.cpu_kernels.argmax: our kernel where it applies, torch.argmax elsewhere."""
    x = torch.randn(4, 300)
    for logits in (x, x.bfloat16(), x.t().contiguous().t(), x[:, ::2], x[:1]):
        assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(dim=-1))


def test_greedy_argmax_builds_nothing_for_logits_it_leaves_to_torch(monkeypatch):
    """fp64, bf16 or 1-d logits (or a GPU's) never reach the kernel, so they do not
    build it (a first build takes seconds)."""
    monkeypatch.setattr(cpu_kernels, "_argmax", None)
    monkeypatch.setattr(cpu_kernels, "_avx512_or_avx2", lambda name: pytest.fail("built"))
    x = torch.randn(3, 50)
    for logits in (x.double(), x.bfloat16(), x[0]):
        assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(dim=-1))
    assert cpu_kernels._argmax is None


def test_greedy_argmax_runs_the_best_kernel_this_cpu_runs(monkeypatch):
    if not CAN_BUILD:
        pytest.skip("cannot build here")
    monkeypatch.setattr(cpu_kernels, "_argmax", None)
    cpu_kernels.argmax(torch.randn(2, 20))
    best = (torch.ops.gpt2.argmax_rows if HAS_AVX512
            else torch.ops.gpt2.argmax_rows_avx2 if HAS_AVX2 else False)  # fmt: skip
    assert cpu_kernels._argmax is best


@pytest.mark.parametrize("kernel", ARGMAX_KERNELS)
def test_argmax_rows_rejects_wrong_inputs_with_a_message(kernel):
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(5))
    with pytest.raises(RuntimeError, match="1 to 2"):
        kernel(torch.randn(3, 0))


# -- int8 weights x bf16 rows ("int8-weight-only") ---------------------------------------


def int8wo_check(kernel, x, q, scale, b):
    """The kernel against float64: the rows rounded to bf16 (as x.bfloat16()), times the
    int8 weight, times the scales, plus the bias; fp32 sums in any order (at most
    terms + 2 units of 2^-24 of the sum of |terms|)."""
    y = kernel(x, q, scale, b)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == torch.float32
    xb, s = x.bfloat16().double(), scale.double()
    ref = (xb @ q.double().T) * s + (0 if b is None else b.double())
    size = (xb.abs() @ q.double().abs().T) * s + (0 if b is None else b.double().abs())
    err = (y.double() - ref).abs()
    assert (err <= (x.shape[1] + 2) * 2**-24 * size + 1e-38).all(), (err / size).max()
    return err, ref


def int8wo_case(rows, n_out, n_in, gen):
    q = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, generator=gen)
    return (torch.randn(rows, n_in, generator=gen), q, torch.rand(n_out, generator=gen) * 0.01,
            torch.randn(n_out, generator=gen))  # fmt: skip


@pytest.mark.parametrize("kernel", INT8WO_KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (37, 96), (5, 1600)])
def test_int8wo_linear_is_the_float64_product_of_bf16_rows(rows, n_out, n_in, kernel):
    x, q, scale, b = int8wo_case(rows, n_out, n_in, torch.Generator().manual_seed(rows + n_out))
    int8wo_check(kernel, x, q, scale, b)
    # closer to its exact product than PyTorch's kernel for this is to its own (which
    # rounds the product to bf16); both with bf16 scales, as checkpoints store them
    scale = scale.bfloat16()
    exact = (x.bfloat16().double() @ q.double().T) * scale.double()
    ours, _ = int8wo_check(kernel, x, q, scale.float(), None)
    theirs = torch._weight_int8pack_mm(x.bfloat16(), q, scale).double()
    assert ours.max() * 100 < (theirs - exact).abs().max()


@pytest.mark.parametrize("kernel", INT8WO_KERNELS)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), k=st.integers(1, 6), n_out=st.integers(1, 70),
       bias=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_int8wo_linear_any_shape(kernel, rows, k, n_out, bias, seed):
    """Any rows and outputs; inputs in multiples of 32 (AMX's slices: every width in GPT-2)
    and, for the AVX-512 kernel, any width."""
    gen = torch.Generator().manual_seed(seed)
    n_in = 32 * k if kernel is amx_int8wo or seed % 2 else 32 * k - seed % 31
    x, q, scale, b = int8wo_case(rows, n_out, n_in, gen)
    int8wo_check(kernel, x * 10, q, scale, b if bias else None)


@pytest.mark.parametrize("kernel", INT8WO_KERNELS)
def test_int8wo_kernels_reject_wrong_inputs_with_a_message(kernel):
    q, s = torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="widths differ|does not fit"):
        kernel(torch.randn(1, 64), q, s, None)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        kernel(torch.randn(1, 32).bfloat16(), q, s, None)
    with pytest.raises(RuntimeError, match="one per output"):
        kernel(torch.randn(1, 32), q, s[:7], None)
    with pytest.raises(RuntimeError, match="one per output"):
        kernel(torch.randn(1, 32), q, s, torch.zeros(8, dtype=torch.float64))


# -- no rows -------------------------------------------------------------------------------


def test_no_rows_give_an_empty_result():
    """A batch of nothing (e.g. every row finished) is (0, out), not a fault: the AMX
    kernels must not configure tiles of 0 rows."""
    if not CAN_BUILD:
        pytest.skip("cannot build here")
    gen = torch.Generator().manual_seed(0)
    q, wsum, scale, b = int8_case(1, 40, 64, gen)
    x = torch.zeros(0, 64)
    args = {"bf16": (x.bfloat16(), q.bfloat16(), b.bfloat16()), "int8": (x, q, wsum, scale, b),
            "int8wo": (x, q, scale, b), "fp32": (x, q.float(), b)}
    kinds = {"bf16": BF16_KERNELS, "int8": INT8_KERNELS, "int8wo": INT8WO_KERNELS,
             "fp32": FP32_KERNELS}
    calls = [(k.values[0], args[kind]) for kind, ks in kinds.items() for k in ks
             if k.values[0] is not None]
    assert calls
    for kernel, kernel_args in calls:
        assert kernel(*kernel_args).shape == (0, 40)


# -- GELU ----------------------------------------------------------------------------------


def gelu_float64(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU in float64 as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the
    same function as 0.5 x (1 + tanh u) (checked against mpmath below), without the
    cancellation of 1 + tanh u that leaves PyTorch's own float64 GELU wrong below -7."""
    xd = x.double()
    return xd * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3))


def gelu_bound(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How far the kernel may be from `ref`: fp32 rounding of x + 0.044715 x^3 and of
    z = -2u moves exp(z) by ~3|z| units of 2^-24, plus the exp series and the division
    (4 units); results below 2^-120, where 1 + exp(z) overflows fp32, may come out 0."""
    xd = x.double()
    z = (2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3)).abs()
    return (3 * z + 4) * 2.0**-24 * ref.abs() + 2.0**-120


def test_the_float64_gelu_oracle_is_the_exact_function():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 400  # 1 + tanh(u) cancels in mpmath too: enough digits to see e^-600
    for v in [-20.0, -9.0, -7.1, -5.0, -3.3, -0.3, 0.0, 1e-30, 0.7, 3.0, 12.0]:
        x = mpmath.mpf(v)
        u = mpmath.sqrt(2 / mpmath.pi) * (x + mpmath.mpf("0.044715") * x**3)
        exact = float(x * (1 + mpmath.tanh(u)) / 2)
        ours = gelu_float64(torch.tensor([v], dtype=torch.float64)).item()
        assert ours == pytest.approx(exact, rel=1e-12, abs=1e-300)


def gelu_inputs(seed: int) -> torch.Tensor:
    """Every magnitude (random fp32 bit patterns), a fine grid where GELU bends, typical
    activations, and the specials."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (300_000,), dtype=torch.int64, generator=gen)
    return torch.cat([bits.to(torch.int32).view(torch.float32), torch.linspace(-12, 12, 200_001),
                      torch.randn(100_000, generator=gen) * 4, torch.tensor(SPECIAL)])  # fmt: skip


GELU_KERNELS = avx512_and_avx2("gelu_tanh")


@pytest.mark.parametrize("kernel", GELU_KERNELS)
def test_gelu_tanh_is_the_exact_function_to_fp32_rounding(kernel):
    x = gelu_inputs(0)
    y, ref = kernel(x), gelu_float64(x)
    finite = ref.isfinite()
    assert ((y.double() - ref).abs() <= gelu_bound(x, ref))[finite].all()
    # infinities and NaN, the signs of zeros and overflowing x^3: as PyTorch's GELU gives them
    expected = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(y[~finite], expected[~finite], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y[y == 0].signbit(), x[y == 0].signbit())


@pytest.mark.parametrize("kernel", GELU_KERNELS)
def test_gelu_tanh_is_closer_to_the_function_than_pytorchs_for_negative_x(kernel):
    """The reason it computes x / (1 + exp(-2u)): PyTorch's fp32 1 + tanh(u) cancels."""
    x = torch.linspace(-6, -2, 40_001)
    ref = gelu_float64(x)
    ours = (kernel(x).double() - ref).abs() / ref.abs()
    theirs = (F.gelu(x, approximate="tanh").double() - ref).abs() / ref.abs()
    assert ours.max() < 1e-5 < 0.1 < theirs.max()
    assert ours.mean() < theirs.mean() / 100


@needs_avx512
@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16")
def test_gelu_tanh_of_every_bf16_value_is_the_exact_function_rounded_to_bf16():
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    y, ref = torch.ops.gpt2.gelu_tanh(x), gelu_float64(x)
    finite = ref.isfinite()
    half_step = 2.0**-8 * ref.abs()  # bf16 keeps 8 significant bits
    assert ((y.double() - ref).abs() <= gelu_bound(x, ref) + half_step)[finite].all()
    # the fp32 kernel's value rounded to nearest (even) bf16, except that the rounding
    # instruction flushes subnormal values (below 2^-126) to zero
    fp32 = torch.ops.gpt2.gelu_tanh(x.float())
    normal = ~(fp32.abs() < 2.0**-126)
    torch.testing.assert_close(y[normal], fp32[normal].bfloat16(), rtol=0, atol=0, equal_nan=True)
    assert (y[~normal] == 0).all()


@pytest.mark.parametrize("kernel", GELU_KERNELS)
@pytest.mark.parametrize("shape", [(1,), (7,), (15,), (16,), (17,), (3, 3072), (2, 5, 1600),
                                   (8191,), (8192,), (8193,), (3, 8199), (0,), (0, 3072)])
def test_gelu_tanh_of_any_shape(kernel, shape):
    """Every element once, whole vectors or not, one thread's chunk or several."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3
    y, ref = kernel(x), gelu_float64(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y.double() - ref).abs() <= gelu_bound(x, ref)).all()


def test_gelu_takes_any_tensor_and_leaves_autograd_to_pytorch():
    """gpt2.cpu_kernels.gelu: our kernel for inference on fp32/bf16 CPU tensors, F.gelu
    for everything else; the same function either way."""
    x = torch.randn(4, 300) * 3
    for t in (x, x.bfloat16(), x.half(), x.double(), x.t(), x[:, ::2]):
        ref = gelu_float64(t)
        tol = 2.0**-8 if t.dtype in (torch.bfloat16, torch.half) else 1e-5
        assert t.shape == cpu_kernels.gelu(t).shape
        torch.testing.assert_close(cpu_kernels.gelu(t).double(), ref, rtol=tol, atol=1e-6)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    cpu_kernels.gelu(ours).sum().backward()
    F.gelu(theirs, approximate="tanh").sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("kernel", GELU_KERNELS)
def test_gelu_tanh_rejects_wrong_inputs_with_a_message(kernel):
    with pytest.raises(RuntimeError, match="must be a contiguous fp32"):
        kernel(torch.randn(4, 6).t())
    with pytest.raises(RuntimeError, match="must be a contiguous fp32"):
        kernel(torch.arange(5))


def test_gelu_runs_the_best_kernel_this_cpu_runs(monkeypatch):
    if not CAN_BUILD:
        pytest.skip("cannot build here")
    monkeypatch.setattr(cpu_kernels, "_gelu", {})
    assert cpu_kernels._gelu_op(torch.float32) is (
        torch.ops.gpt2.gelu_tanh if HAS_AVX512 else torch.ops.gpt2.gelu_tanh_avx2 if HAS_AVX2
        else None)  # fmt: skip
    assert cpu_kernels._gelu_op(torch.bfloat16) is (torch.ops.gpt2.gelu_tanh if HAS_BF16 else None)
    assert cpu_kernels._gelu_op(torch.float16) is None


# -- int8 ----------------------------------------------------------------------------------


def int8_case(rows, n_out, n_in, gen, *, bias=True):
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    q, scale = quantize_weight_int8(w)
    b = torch.randn(n_out, generator=gen) if bias else None
    return q, q.sum(dim=1, dtype=torch.int32), scale.float(), b


def int8_check(kernel, x, q, wsum, scale, b):
    y = kernel(x, q, wsum, scale, b)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == torch.float32
    wd = q.double() * scale.double()[:, None]  # the format's numbers, written out
    ref = x.double() @ wd.T + (0 if b is None else b.double())
    # each row is rounded to 256 levels (128 on AVX2) over its range [min(x, 0),
    # max(x, 0)]: at most half a step per activation, times |w|; plus fp32 rounding
    levels = 127 if kernel is avx2_int8 else 255
    lo, hi = x.double().amin(dim=1, keepdim=True).clamp(max=0), x.double().amax(
        dim=1, keepdim=True).clamp(min=0)  # fmt: skip
    bound = (hi - lo) / levels / 2 * wd.abs().sum(dim=1) + 1e-6 * (ref.abs() + 1)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    return y, ref


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 20, 64, 203])
# past 8 rows the channels go in slices of ~128 KB of weight, each through every block
# of rows: several slices a thread (2304 x 768: 168 channels each), a partial last one
# (1000 x 1000), the smallest slice (12 channels of 12000 inputs), one slice (37 x 100)
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (1000, 1000), (37, 100),
                                             (3, 1600), (50, 12000)])
def test_int8_linear_is_within_its_rounding_of_the_float64_product(rows, n_out, n_in, kernel):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    q, wsum, scale, b = int8_case(rows, n_out, n_in, gen)
    x = torch.randn(rows, n_in, generator=gen)
    x[0] *= 1000  # a row far larger than the rest must not cost the others precision
    y, ref = int8_check(kernel, x, q, wsum, scale, b)
    # and the bound is not vacuous: close to the float product (7 bits: twice the error)
    close = 0.04 if kernel is avx2_int8 else 0.02
    assert (y.double() - ref).abs().max() <= close * ref.abs().max()
    int8_check(kernel, x, q, wsum, scale, None)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), n_in=st.integers(1, 200), n_out=st.integers(1, 70),
       seed=st.integers(0, 2**16), positive=st.booleans())  # fmt: skip
def test_int8_linear_any_shape(kernel, rows, n_in, n_out, seed, positive):
    gen = torch.Generator().manual_seed(seed)
    q, wsum, scale, b = int8_case(rows, n_out, n_in, gen)
    x = torch.randn(rows, n_in, generator=gen) * 3
    if positive:  # a row's range then starts at 0 (after GELU, say): the zero point is 0
        x = x.abs()
    int8_check(kernel, x, q, wsum, scale, b)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_int8_linear_extremes(kernel):
    """All-zero rows give the bias; weights and activations at the ends of their ranges
    cannot overflow the int32 sums (255 * 127 * 6400 fits)."""
    q = torch.full((16, 6400), 127, dtype=torch.int8)
    q[1::2] = -127
    wsum, scale, b = q.sum(dim=1, dtype=torch.int32), torch.full((16,), 2.0**-7), torch.ones(16)
    x = torch.zeros(3, 6400)
    x[1] = 5.0
    x[2] = -5.0
    int8_check(kernel, x, q, wsum, scale, b)
    assert torch.equal(kernel(x[:1], q, wsum, scale, b), b[None])


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("n_in", [100, 768])  # a NaN in the vector body and in the tail
def test_int8_linear_rows_with_nan_or_inf_come_out_nan(kernel, n_in):
    """As a float product's would be non-finite: the model's NaN check must see them. (The
    quantizer's min and max drop a NaN, and an inf row once came out finite garbage.)"""
    gen = torch.Generator().manual_seed(n_in)
    q, wsum, scale, b = int8_case(6, 40, n_in, gen)
    x = torch.randn(6, n_in, generator=gen)
    x[1, 3], x[3, n_in - 1], x[4, n_in // 2] = float("nan"), float("inf"), float("-inf")
    y = kernel(x, q, wsum, scale, b)
    bad = [1, 3, 4]
    assert torch.isnan(y[bad]).all()
    good = [0, 2, 5]
    assert torch.equal(y[good], kernel(x[good], q, wsum, scale, b))
    assert torch.isfinite(y[good]).all()


@needs_amx
@pytest.mark.parametrize("rows", [1, 16, 20, 64, 300])
def test_amx_and_vnni_int8_agree_exactly(rows):
    """The same quantized rows and integer sums, the same epilogue: bit for bit equal,
    whether AMX multiplies one block of rows or many (a prompt, with a partial last one)."""
    gen = torch.Generator().manual_seed(rows)
    q, wsum, scale, b = int8_case(rows, 300, 200, gen)
    x = torch.randn(rows, 200, generator=gen)
    vnni = torch.ops.gpt2.int8_linear(x, q, wsum, scale, b)
    assert torch.equal(amx_int8(x, q, wsum, scale, b), vnni)


@pytest.mark.skipif(not (HAS_VNNI and CAN_BUILD), reason="no AVX512-VNNI kernels here")
@pytest.mark.parametrize("rows", [1, 2, 17, 64, 203, 700])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (37, 100), (3, 1600), (50, 12000)])
def test_onednn_and_our_int8_products_agree_exactly(rows, n_out, n_in):
    """Prompts on AVX512-VNNI go through oneDNN's int8 product between our quantizer
    and epilogue: the same integers and the same float operations as our kernel, so
    the same result to the bit (tails of 64 inputs and 16 outputs included)."""
    gen = torch.Generator().manual_seed(rows * 7 + n_in)
    q, wsum, scale, b = int8_case(rows, n_out, n_in, gen)
    x = torch.randn(rows, n_in, generator=gen)
    x[0] *= 1000
    if rows > 2:
        x[1] = 0  # scale 1, zero point 0
        x[2] = x[2].abs()  # zero point 0: the shifted rows' zero is -128
    for bias in (b, None):
        ours = torch.ops.gpt2.int8_linear(x, q, wsum, scale, bias)
        assert torch.equal(onednn_int8(x, q, wsum, scale, bias), ours)
        assert torch.equal(cpu_kernels._int8_vnni(x, q, wsum, scale, bias), ours)


@pytest.mark.parametrize("which", ["bf16_linear", "bf16_linear_amx", "int8_linear",
                                   "int8_linear_amx", "int8_linear_avx2",
                                   "fp32_linear", "fp32_linear_avx2",
                                   "argmax_rows", "argmax_rows_avx2", "gelu_tanh",
                                   "gelu_tanh_avx2", "int8wo_linear",
                                   "int8wo_linear_amx", "int8_quantize_rows",
                                   "int8_rescale"])  # fmt: skip
def test_ops_are_well_formed_for_torch_compile(which):
    """Schema, the shapes registered for tracing (torch.compile, the meta device) and
    what the op really returns agree (PyTorch's own checker)."""
    needs = {"bf16_linear": HAS_BF16, "int8_linear": HAS_VNNI, "int8_linear_avx2": HAS_AVX2,
             "int8_quantize_rows": HAS_VNNI, "int8_rescale": HAS_VNNI,
             "fp32_linear": HAS_AVX512, "argmax_rows": HAS_AVX512, "gelu_tanh": HAS_AVX512,
             "int8wo_linear": HAS_BF16, "gelu_tanh_avx2": HAS_AVX2,
             "argmax_rows_avx2": HAS_AVX2,
             "fp32_linear_avx2": HAS_AVX2}.get(which, HAS_AMX)  # fmt: skip
    if not (needs and CAN_BUILD):
        pytest.skip("no such kernel here")
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=gen)
    w, x, b = q.bfloat16(), torch.randn(3, 64), torch.randn(40)
    tail = (q.sum(dim=1, dtype=torch.int32), torch.rand(40), b)
    args = {
        "bf16_linear": (x.bfloat16(), w, b.bfloat16()),
        "bf16_linear_amx": (x.bfloat16(), cpu_kernels.amx_layout(w, 2), 40, None),
        "int8_linear": (x, q, *tail),
        "int8_linear_avx2": (x, q, *tail),
        "int8_linear_amx": (x, cpu_kernels.amx_layout(q, 4), 40, *tail),
        "fp32_linear": (x, q.float(), b),
        "fp32_linear_avx2": (x, q.float(), b),
        "argmax_rows": (x,),
        "argmax_rows_avx2": (x,),
        "gelu_tanh": (torch.randn(2, 3, 37),),
        "gelu_tanh_avx2": (torch.randn(2, 3, 37),),
        "int8wo_linear": (x, q, tail[1], b),
        "int8wo_linear_amx": (x, cpu_kernels.amx_layout(q, 2), 40, tail[1], b),
        "int8_quantize_rows": (x, torch.empty(3), torch.empty(3, dtype=torch.int32)),
        "int8_rescale": (torch.randint(-9999, 9999, (3, 40), dtype=torch.int32, generator=gen),
                         torch.rand(3), torch.randint(-128, 128, (3,), dtype=torch.int32), *tail),
    }[which]
    torch.library.opcheck(getattr(torch.ops.gpt2, which).default, args)


# -- the layers use them -------------------------------------------------------------------


def ops_run(fn) -> list[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return [e.name for e in prof.events()]


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_runs_our_gelu_for_inference_and_pytorchs_for_training(dtype):
    from gpt2.config import GPT2Config
    from gpt2.model import GPT2

    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("no AVX512-BF16")
    model = GPT2(GPT2Config(n_layer=3, n_embd=32, n_head=2, n_vocab=50, n_ctx=16)).to(dtype)
    idx = torch.randint(50, (2, 7))
    with torch.inference_mode():
        names = ops_run(lambda: model(idx))
    assert names.count("gpt2::gelu_tanh") == 3 and "aten::gelu" not in names
    names = ops_run(lambda: model(idx)[0].sum().backward())
    assert names.count("aten::gelu") == 3 and "gpt2::gelu_tanh" not in names



def count_calls(layer):
    """Make the layer's kernel record the rows of each call."""
    calls = []
    kernel = layer._native

    def counting(x, *args):
        calls.append(x.shape[0])
        return kernel.op(x, *args)

    layer._native = kernel._replace(op=counting)
    return calls


@pytest.mark.parametrize("cpu", ["amx", "vnni", "avx2"])
def test_int8_layer_runs_our_kernel_for_decoding_rows_only(cpu, monkeypatch):
    if not {"amx": HAS_AMX, "vnni": HAS_VNNI, "avx2": HAS_AVX2}[cpu] or not CAN_BUILD:
        pytest.skip("no such kernel here")
    cpu_kernels.load()
    if cpu != "amx":  # what a CPU without AMX runs
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    if cpu == "avx2":  # ... and without AVX-512
        monkeypatch.setattr(cpu_kernels, "int8_available", lambda: False)
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1)
    most = {"amx": cpu_kernels.AMX_INT8_MAX_ROWS, "vnni": cpu_kernels.INT8_MAX_ROWS,
            "avx2": 8}[cpu]
    assert layer._native.max_rows == most and f"up to {most} rows" in repr(layer)
    assert layer.activation_bits == (7 if cpu == "avx2" else 8)
    # FBGEMM (and its copy of the weight) only for the rows ours leaves: AVX2's past 8
    assert (layer._packed is None) == (cpu != "avx2")
    calls = count_calls(layer)
    for rows in (1, 8, most, most + 1):
        x = torch.randn(rows, 1, 64)
        exact = F.linear(x, layer.weight.float() * layer.weight_scale.float()[:, None],
                         layer.bias)  # fmt: skip
        assert (layer(x) - exact).abs().max() <= 0.02 * exact.abs().max()
    assert calls == [1, 8, most]
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous: copied, same result
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_int8_layer_takes_onednns_product_for_prompts_without_amx(monkeypatch):
    if not (HAS_VNNI and CAN_BUILD):
        pytest.skip("no AVX512-VNNI kernels here")
    cpu_kernels.load()
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1)
    least = cpu_kernels.INT8_ONEDNN_MIN_ROWS
    for rows in (least - 1, least, 3 * least):
        x = torch.randn(rows, 64)
        names = ops_run(lambda x=x: layer(x))
        assert ("aten::_int_mm" in names) == (rows >= least), rows
        assert ("gpt2::int8_linear" in names) == (rows < least), rows
        assert torch.equal(layer(x), torch.ops.gpt2.int8_linear(x, *layer._native.args))


@pytest.mark.parametrize("amx", [True, False])
def test_int8_weight_only_layer_runs_our_kernel_for_decoding_rows_only(amx, monkeypatch):
    if not (HAS_AMX if amx else HAS_BF16) or not CAN_BUILD:
        pytest.skip("no such kernel here")
    if not amx:  # what a CPU with AVX512-BF16 but no AMX runs
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1,
                                   activations="bf16")  # fmt: skip
    # AMX: 256 rows a call, in blocks; AVX512-BF16: the weight in slices past 8 rows
    most = cpu_kernels.AMX_BF16_MAX_ROWS if amx else cpu_kernels.INT8WO_MAX_ROWS
    assert layer.kernel == "bf16" and layer.activation_bits is None
    assert layer._native.max_rows == most and f"bf16 (gpt2 {'AMX' if amx else 'AVX512-BF16'}" \
        f" kernel up to {most} rows)" in repr(layer)
    calls = count_calls(layer)
    w = layer.weight.double() * layer.weight_scale.double()[:, None]
    for rows in (1, 8, most, most + 1):
        x = torch.randn(rows, 1, 64)
        exact = x.bfloat16().double() @ w.T + layer.bias.double()
        assert (layer(x).double() - exact).abs().max() <= 0.01 * exact.abs().max()
    assert calls == [1, 8, most]
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous: copied, same result
    assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_layer_runs_our_kernel_for_decoding_rows_only(amx, monkeypatch):
    if not (HAS_AMX if amx else HAS_BF16) or not CAN_BUILD:
        pytest.skip("no such kernel here")
    if not amx:  # what a CPU with AVX512-BF16 but no AMX runs
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    layer = PackedBF16Linear.from_linear(torch.nn.Linear(64, 96))
    most = cpu_kernels.AMX_BF16_MAX_ROWS if amx else 8
    assert layer._native.max_rows == most and (layer._packed is None) == amx
    calls = count_calls(layer)
    for rows in (1, 4, most, most + 1):
        x = torch.randn(rows, 1, 64).bfloat16()
        y = layer(x)
        assert y.shape == (rows, 1, 96)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert (y.float() - exact).abs().max() <= 0.02 * exact.abs().max()
    assert calls == [1, 4, most]
    x = torch.randn(64, 5).bfloat16().t()  # (5, 64), not contiguous: copied, same result
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_bf16_lm_head_makes_onednns_copy_only_when_a_product_needs_it(monkeypatch):
    """Without AMX, oneDNN's copy of the weight serves products past our kernel's 8 rows.
    The LM head (wte's weight) makes it at the first such product: generating (a few rows,
    prompts at their last position) never does, so wte is held once."""
    import copy

    from gpt2.config import GPT2Config
    from gpt2.model import GPT2
    from gpt2.quantize import prepare_bf16

    if not HAS_BF16 or not CAN_BUILD:
        pytest.skip("no AVX512-BF16 kernel here")
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)  # as such a CPU runs
    torch.manual_seed(0)
    model = prepare_bf16(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96)).eval())
    head = model.lm_head
    assert head._packed is None and head._packed_later and "at first use" in repr(head)
    assert model.h[0].mlp.c_fc._packed is not None  # the blocks' (prompts need them)
    idx = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        model.generate(idx[:, :3], max_new_tokens=4, temperature=0.0)  # 1-row products
        model(idx, last_only=True)
        assert head._packed is None
        eager = PackedBF16Linear(model.wte.weight, None, persistent=False)  # packed now
        x = torch.randn(12, 64).bfloat16()  # past the kernel's rows: oneDNN's product
        assert torch.equal(head(x), eager(x))
    assert head._packed is not None and not head._packed_later
    assert copy.deepcopy(model).lm_head._packed_later  # a copy starts without it again


# -- building ------------------------------------------------------------------------------


def run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a new Python process (the kernels load once per process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    """No compiler: one warning, and the layers run PyTorch's kernels as before."""
    done = run_fresh(
        """
        import warnings, torch
        from gpt2 import cpu_kernels
        from gpt2.quantize import Int8Linear
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_kernels.load() and not cpu_kernels.load()
            layer = Int8Linear.from_weight(torch.randn(8, 16))
            assert layer._native is None and layer(torch.randn(2, 16)).shape == (2, 8)
        print(len(caught), caught[0].message if caught else "")
        """,
        CXX=str(tmp_path / "no-such-compiler"), GPT2_HOME=str(tmp_path / "home"),
    )
    assert done.returncode == 0, done.stderr
    if not CAN_BUILD or not (HAS_BF16 or HAS_VNNI):
        return  # the kernels were never tried here: nothing to warn about
    count, message = done.stdout.strip().split(" ", 1)
    assert count == "1" and "could not build gpt2's CPU kernels" in message


def test_a_failed_build_is_not_reported_for_fp32_batches(tmp_path):
    """fp32 decoding gains little from the kernels: falling back is silent there, and
    the first bf16/int8 layer after it still gets the one warning."""
    done = run_fresh(
        """
        import warnings, torch
        import gpt2.products
        from gpt2 import cpu_kernels
        from gpt2.quantize import Int8Linear
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w, x = torch.randn(8, 16), torch.randn(4, 16)
            with torch.no_grad():
                y = gpt2.products.matmul_t(x, w)
            assert torch.allclose(y, x @ w.T, atol=1e-5) and cpu_kernels.fp32_op() is None
            print(len(caught), end=" ")
            Int8Linear.from_weight(torch.randn(8, 16))
        print(len(caught), caught[-1].message if caught else "")
        """,
        CXX=str(tmp_path / "no-such-compiler"), GPT2_HOME=str(tmp_path / "home"),
    )
    assert done.returncode == 0, done.stderr
    if not CAN_BUILD or not (HAS_BF16 or HAS_VNNI):
        return  # the kernels were never tried here: nothing to warn about
    before, after, message = done.stdout.strip().split(" ", 2)
    assert (before, after) == ("0", "1") and "could not build gpt2's CPU kernels" in message


def test_the_command_line_says_so_in_one_line(tmp_path, hf_checkpoint):
    """`gpt2 generate --quantize int8` without a compiler: one warning line, then the text."""
    if not CAN_BUILD or not (HAS_BF16 or HAS_VNNI):
        pytest.skip("the kernels are never tried here")
    ckpt = hf_checkpoint(n_vocab=50257, n_embd=32, n_head=2, n_ctx=64, std=0.3)
    done = subprocess.run(
        [sys.executable, "-m", "gpt2", "generate", "Hello", "--model", str(ckpt.folder),
         "--quantize", "int8", "-n", "3", "-t", "0"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
             "GPT2_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("gpt2: warning: could not build")
    assert "Traceback" not in done.stderr and done.stdout.startswith("Hello")


def test_turned_off_by_the_environment(tmp_path):
    done = run_fresh(
        "from gpt2 import cpu_kernels; print(cpu_kernels.load())",
        GPT2_CPU_KERNELS="0", GPT2_HOME=str(tmp_path),
    )
    assert done.returncode == 0 and done.stdout.strip() == "False"
    assert not (tmp_path / "kernels").exists()  # nothing was built


@pytest.mark.skipif(not CAN_BUILD or not (HAS_BF16 or HAS_VNNI), reason="cannot build here")
def test_a_build_lands_whole_in_its_own_cache(tmp_path):
    """...and others can load it (a shared GPT2_HOME): rwx less the umask, not mkstemp's 0600."""
    before = os.umask(0o022)  # the build runs in a child, which inherits it
    try:
        done = run_fresh("from gpt2 import cpu_kernels; print(cpu_kernels.load())",
                         GPT2_HOME=str(tmp_path))  # fmt: skip
    finally:
        os.umask(before)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert [p.suffix for p in built] == [".so"] and not built[0].name.startswith(".build-")
    assert oct(built[0].stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("cpu", ["amx", "vnni", "avx2"])
def test_int8_model_through_each_kernel_is_close_to_transformers(cpu, hf_checkpoint, monkeypatch):
    """A whole int8 model fed as decoding feeds it (8 rows per call), on each CPU's kernel,
    against transformers in fp32 on the same weights."""
    from gpt2.model import GPT2
    from gpt2.quantize import quantize_model

    if not {"amx": HAS_AMX, "vnni": HAS_VNNI, "avx2": HAS_AVX2}[cpu] or not CAN_BUILD:
        pytest.skip("no such kernel here")
    cpu_kernels.load()
    if cpu != "amx":
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    if cpu == "avx2":
        monkeypatch.setattr(cpu_kernels, "int8_available", lambda: False)
    ckpt = hf_checkpoint()
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), "int8")
    assert model.h[0].mlp.c_fc._native.name == {"amx": "AMX", "vnni": "AVX512-VNNI",
                                                "avx2": "AVX2"}[cpu]  # fmt: skip
    errors = []
    for seed in range(3):
        idx = torch.randint(0, ckpt.config.n_vocab, (1, 8),
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        with torch.no_grad():
            ref = ckpt.model(idx).logits  # (1, 8, V)
            errors.append(((model(idx) - ref).abs().max() / ref.std()).item())
    assert max(errors) <= 0.3
