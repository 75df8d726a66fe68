"""gpt2's own CPU kernels (gpt2/cpu_kernels.cpp) against products computed in float64.

Oracle: the same numbers multiplied in float64 by PyTorch (`x.double() @ w.double().T`),
with the error each kernel's rounding may add written out: bf16 output rounding for
`bf16_linear`, and half a step of each row's 8-bit grid for `int8_linear`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2 import cpu_kernels
from gpt2.quantize import Int8Linear, PackedBF16Linear, quantize_weight_int8

HAS_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
HAS_VNNI = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()) and bool(
    getattr(torch.cpu, "_is_avx512_supported", lambda: False)()
)
CAN_BUILD = (
    shutil.which("c++") is not None
    and tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10)
    and os.environ.get(cpu_kernels.ENV, "1") != "0"
)
needs_bf16 = pytest.mark.skipif(not (HAS_BF16 and CAN_BUILD),
                                reason="no AVX512-BF16, compiler or PyTorch >= 2.10")  # fmt: skip
needs_vnni = pytest.mark.skipif(not (HAS_VNNI and CAN_BUILD),
                                reason="no AVX512-VNNI, compiler or PyTorch >= 2.10")  # fmt: skip


def test_kernels_build_wherever_they_can_run():
    """No silent fallback: on a CPU with the instructions, a compiler and PyTorch >= 2.10,
    the kernels must build and load (else every test below would quietly test nothing)."""
    if not ((HAS_BF16 or HAS_VNNI) and CAN_BUILD):
        pytest.skip("this machine cannot run the kernels")
    assert cpu_kernels.load()
    assert cpu_kernels.bf16_available() == HAS_BF16
    assert cpu_kernels.int8_available() == HAS_VNNI


# -- bf16 ----------------------------------------------------------------------------------


def bf16_reference(x, w, b):
    ref = x.double() @ w.double().T
    return ref if b is None else ref + b.double()


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (37, 100), (5, 1600)])
def test_bf16_linear_is_the_float64_product_rounded_to_bf16(rows, n_out, n_in):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = (torch.randn(n_out, n_in, generator=gen) * 0.05).bfloat16()
    for b in (None, torch.randn(n_out, generator=gen).bfloat16()):
        y = torch.ops.gpt2.bf16_linear(x, w, b)
        assert y.shape == (rows, n_out) and y.dtype == torch.bfloat16
        ref = bf16_reference(x, w, b)
        # bf16 rounding of the result (2^-9 relative) plus fp32 sums (n_in terms)
        bound = 2**-8 * ref.abs() + 1e-6 * n_in * (x.double().abs() @ w.double().abs().T)
        assert ((y.double() - ref).abs() <= bound + 1e-30).all()


@needs_bf16
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), n_in=st.integers(1, 130), n_out=st.integers(1, 40),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_bf16_linear_any_shape(rows, n_in, n_out, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = torch.randn(n_out, n_in, generator=gen).bfloat16()
    b = torch.randn(n_out, generator=gen).bfloat16()
    y = torch.ops.gpt2.bf16_linear(x, w, b)
    ref = bf16_reference(x, w, b)
    bound = 2**-8 * ref.abs() + 1e-6 * n_in * (x.double().abs() @ w.double().abs().T + 1)
    assert ((y.double() - ref).abs() <= bound).all()


@needs_bf16
def test_bf16_linear_rejects_wrong_inputs_with_a_message():
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="widths differ"):
        torch.ops.gpt2.bf16_linear(torch.randn(1, 16).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor"):
        torch.ops.gpt2.bf16_linear(torch.randn(1, 32), w, None)  # fp32 rows
    with pytest.raises(RuntimeError, match="one per output"):
        torch.ops.gpt2.bf16_linear(torch.randn(1, 32).bfloat16(), w, torch.zeros(7).bfloat16())


# -- int8 ----------------------------------------------------------------------------------


def int8_case(rows, n_out, n_in, gen, *, bias=True):
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    q, scale = quantize_weight_int8(w)
    b = torch.randn(n_out, generator=gen) if bias else None
    return q, q.sum(dim=1, dtype=torch.int32), scale.float(), b


def int8_check(x, q, wsum, scale, b):
    y = torch.ops.gpt2.int8_linear(x, q, wsum, scale, b)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == torch.float32
    wd = q.double() * scale.double()[:, None]  # the format's numbers, written out
    ref = x.double() @ wd.T + (0 if b is None else b.double())
    # each row is rounded to 256 levels over its range [min(x, 0), max(x, 0)]: at most
    # half a step per activation, times |w|; plus fp32 rounding of the rescaled sum
    lo, hi = x.double().amin(dim=1, keepdim=True).clamp(max=0), x.double().amax(
        dim=1, keepdim=True).clamp(min=0)  # fmt: skip
    bound = (hi - lo) / 255 / 2 * wd.abs().sum(dim=1) + 1e-6 * (ref.abs() + 1)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    return y, ref


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 20])
@pytest.mark.parametrize(("n_out", "n_in"), [(2304, 768), (768, 3072), (37, 100), (3, 1600)])
def test_int8_linear_is_within_its_rounding_of_the_float64_product(rows, n_out, n_in):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    q, wsum, scale, b = int8_case(rows, n_out, n_in, gen)
    x = torch.randn(rows, n_in, generator=gen)
    x[0] *= 1000  # a row far larger than the rest must not cost the others precision
    y, ref = int8_check(x, q, wsum, scale, b)
    # and the bound is not vacuous: close to the float product
    assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    int8_check(x, q, wsum, scale, None)


@needs_vnni
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), n_in=st.integers(1, 200), n_out=st.integers(1, 40),
       seed=st.integers(0, 2**16), positive=st.booleans())  # fmt: skip
def test_int8_linear_any_shape(rows, n_in, n_out, seed, positive):
    gen = torch.Generator().manual_seed(seed)
    q, wsum, scale, b = int8_case(rows, n_out, n_in, gen)
    x = torch.randn(rows, n_in, generator=gen) * 3
    if positive:  # a row's range then starts at 0 (after GELU, say): the zero point is 0
        x = x.abs()
    int8_check(x, q, wsum, scale, b)


@needs_vnni
def test_int8_linear_extremes():
    """All-zero rows give the bias; weights and activations at the ends of their ranges
    cannot overflow the int32 sums (255 * 127 * 6400 fits)."""
    q = torch.full((16, 6400), 127, dtype=torch.int8)
    q[1::2] = -127
    wsum, scale, b = q.sum(dim=1, dtype=torch.int32), torch.full((16,), 2.0**-7), torch.ones(16)
    x = torch.zeros(3, 6400)
    x[1] = 5.0
    x[2] = -5.0
    int8_check(x, q, wsum, scale, b)
    assert torch.equal(torch.ops.gpt2.int8_linear(x[:1], q, wsum, scale, b), b[None])


# -- the layers use them -------------------------------------------------------------------


@needs_vnni
def test_int8_layer_runs_our_kernel_for_decoding_rows_only(monkeypatch):
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1)
    assert layer._native is not None and "gpt2 kernel" in repr(layer)
    calls = []
    real = torch.ops.gpt2.int8_linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(torch.ops.gpt2, "int8_linear", counting)
    for rows in (1, 8, 16, 17, 40):
        layer(torch.randn(rows, 1, 64))
    assert calls == [1, 8, 16]


@needs_bf16
def test_bf16_layer_runs_our_kernel_for_decoding_rows_only(monkeypatch):
    layer = PackedBF16Linear.from_linear(torch.nn.Linear(64, 96))
    calls = []
    real = torch.ops.gpt2.bf16_linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(torch.ops.gpt2, "bf16_linear", counting)
    for rows in (1, 4, 8, 9, 40):
        y = layer(torch.randn(rows, 1, 64).bfloat16())
        assert y.shape == (rows, 1, 96)
    assert calls == [1, 4, 8]


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
    assert count == "1" and "could not build its CPU kernels" in message


def test_turned_off_by_the_environment(tmp_path):
    done = run_fresh(
        "from gpt2 import cpu_kernels; print(cpu_kernels.load())",
        GPT2_CPU_KERNELS="0", GPT2_HOME=str(tmp_path),
    )
    assert done.returncode == 0 and done.stdout.strip() == "False"
    assert not (tmp_path / "kernels").exists()  # nothing was built


@pytest.mark.skipif(not CAN_BUILD or not (HAS_BF16 or HAS_VNNI), reason="cannot build here")
def test_a_build_lands_whole_in_its_own_cache(tmp_path):
    done = run_fresh("from gpt2 import cpu_kernels; print(cpu_kernels.load())",
                     GPT2_HOME=str(tmp_path))  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert [p.suffix for p in built] == [".so"] and not built[0].name.startswith(".build-")
