"""gpt2.gpu_kernels.decode_attention against PyTorch's scaled_dot_product_attention.

The kernel runs on the GPU where there is one, else on the CPU through Triton's
interpreter (the `triton_device` fixture): the same kernel source either way.
The oracle is SDPA in float64 over the slots the kernel should see, with the
new token's key and value written in by plain indexing. Slots after pos hold
NaN, so reading one would show in the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2 import gpu_kernels
from gpt2.errors import GPT2Error
from gpt2.gpu_kernels import decode_attention


def case(B, nh, hs, L, pos, dtype, device, *, seed=0, q_scale=1.0):
    """Random qkv (B, 3C) and caches (B, nh, L, hs) with NaN after slot pos."""
    g = torch.Generator().manual_seed(seed)
    C = nh * hs
    qkv = torch.randn(B, 3 * C, generator=g)
    qkv[:, :C] *= q_scale
    k = torch.randn(B, nh, L, hs, generator=g)
    v = torch.randn(B, nh, L, hs, generator=g)
    k[:, :, pos + 1:] = float("nan")
    v[:, :, pos + 1:] = float("nan")
    return [t.to(device=device, dtype=dtype) for t in (qkv, k, v)]


def reference(qkv, k, v, pos):
    """(y (B, C) in float64, the caches as they should be afterwards)."""
    B, nh, L, hs = k.shape
    q, k_new, v_new = qkv.view(B, 3, nh, hs).unbind(1)  # (B, nh, hs) each
    k, v = k.clone(), v.clone()
    k[:, :, pos], v[:, :, pos] = k_new, v_new
    seen = slice(0, pos + 1)
    y = F.scaled_dot_product_attention(q.double().unsqueeze(2), k[:, :, seen].double(),
                                       v[:, :, seen].double())  # (B, nh, 1, hs)
    return y.reshape(B, nh * hs), k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, nh, hs, L, pos", [
    (1, 12, 64, 144, 0),  # the first token: only itself to attend to
    (1, 12, 64, 144, 77),  # 124M's heads; two blocks of slots, the second partly masked
    (3, 2, 24, 200, 199),  # several rows; hs not a power of 2; the last slot
    (2, 3, 4, 10, 5),  # less than one block
])
def test_matches_sdpa_and_writes_the_cache(triton_device, dtype, B, nh, hs, L, pos):
    qkv, k, v = case(B, nh, hs, L, pos, dtype, triton_device)
    want, want_k, want_v = reference(qkv.cpu(), k.cpu(), v.cpu(), pos)
    y = decode_attention(qkv, k, v, torch.tensor([pos], device=triton_device))
    assert y.shape == (B, nh * hs) and y.dtype == dtype
    # slot pos holds the new key and value exactly; every other slot is as it was
    torch.testing.assert_close(k.cpu(), want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v.cpu(), want_v, atol=0, rtol=0, equal_nan=True)
    # float32 sums either way: within float32 rounding, or one bf16 rounding of the result
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.cpu().double(), want, **tol)


def test_large_scores_stay_finite(triton_device):
    """Scores in the hundreds (a sharp softmax): the running maximum keeps exp finite."""
    qkv, k, v = case(2, 4, 64, 300, 250, torch.float32, triton_device, q_scale=40.0)
    want, _, _ = reference(qkv.cpu(), k.cpu(), v.cpu(), 250)
    y = decode_attention(qkv, k, v, torch.tensor([250], device=triton_device))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_a_one_line_error():
    qkv = torch.zeros(1, 3 * 16)
    k = torch.zeros(1, 2, 8, 4)  # C = 8, not 16
    with pytest.raises(GPT2Error, match=r"do not fit \(B, 3C\)") as err:
        decode_attention(qkv, k, k.clone(), torch.tensor([0]))
    assert "\n" not in str(err.value)


def test_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(gpu_kernels, "available", lambda: False)
    k = torch.zeros(1, 2, 8, 4)
    with pytest.raises(GPT2Error, match="needs Triton"):
        decode_attention(torch.zeros(1, 24), k, k.clone(), torch.tensor([0]))
