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


# --- cross_entropy ---------------------------------------------------------------------------


def row_weights(N):
    """Distinct weights for the rows' losses, so each row's upstream gradient differs."""
    return torch.linspace(0.5, 2.0, N, dtype=torch.float64)


def ce_reference(logits, targets, w=None):
    """(per-row loss, d(sum of w_i * loss_i)/d logits) in float64 from F.cross_entropy;
    w: row_weights by default."""
    x = logits.detach().cpu().double().requires_grad_()
    loss = F.cross_entropy(x, targets.cpu(), reduction="none")
    (loss * (row_weights(len(loss)) if w is None else w)).sum().backward()
    return loss.detach(), x.grad


def ce_case(N, V, dtype, device, *, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, V, block", [
    (5, 50, 4096),  # one block, most of it masked
    (7, 300, 64),  # several blocks, the last partly masked
    (3, 256, 64),  # V a multiple of the block
])
def test_cross_entropy_matches_pytorch(triton_device, monkeypatch, dtype, N, V, block):
    monkeypatch.setattr(gpu_kernels, "CE_BLOCK", block)
    logits, targets = ce_case(N, V, dtype, triton_device)
    want, want_grad = ce_reference(logits, targets)
    x = logits.clone().requires_grad_()
    loss = gpu_kernels.cross_entropy(x, targets)
    assert loss.shape == (N,) and loss.dtype == torch.float32
    (loss * row_weights(N).to(loss)).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == (N, V)
    # float32 sums: float32 rounding; bf16 logits are read exactly, the gradient is
    # rounded once to bf16 (the loss is float32 either way)
    torch.testing.assert_close(loss.cpu().double(), want, atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, **tol)


def test_cross_entropy_reads_a_strided_view_and_padding_at_minus_inf(triton_device, monkeypatch):
    """A padded head's logits: a slice with a row stride of its own (read in place), or the
    full width with the pad at -inf (probability 0, gradient 0 there): the same loss."""
    monkeypatch.setattr(gpu_kernels, "CE_BLOCK", 32)
    logits, targets = ce_case(6, 100, torch.float32, triton_device)
    want, want_grad = ce_reference(logits, targets, torch.ones(6, dtype=torch.float64))
    padded = torch.cat([logits, torch.full((6, 28), float("-inf"), device=triton_device)], 1)
    for x, width in ((padded[:, :100], 100), (padded, 128)):
        x = x.detach().requires_grad_()
        loss = gpu_kernels.cross_entropy(x, targets)
        loss.sum().backward()
        torch.testing.assert_close(loss.detach().cpu().double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad[:, :100].cpu().double(), want_grad, atol=1e-6,
                                   rtol=1e-5)
        assert x.grad.shape == (6, width) and not x.grad[:, 100:].any()


def test_cross_entropy_large_logits_and_bad_targets(triton_device):
    """Logits in the thousands stay finite (the running max); a target outside [0, V)
    gives NaN for its row only, never a read out of bounds."""
    logits, targets = ce_case(4, 70, torch.float32, triton_device, scale=3000.0)
    want, _ = ce_reference(logits, targets)
    torch.testing.assert_close(gpu_kernels.cross_entropy(logits, targets).cpu().double(), want,
                               atol=1e-3, rtol=1e-6)
    targets[1], targets[2] = 70, -100
    loss = gpu_kernels.cross_entropy(logits, targets).cpu()
    assert loss[[1, 2]].isnan().all()
    torch.testing.assert_close(loss[[0, 3]].double(), want[[0, 3]], atol=1e-3, rtol=1e-6)


def test_cross_entropy_is_a_well_formed_operator(triton_device):
    """torch.library's checks of the operator (fake tensors for torch.compile, the
    registered autograd against its own gradients), and a compiled caller."""
    logits, targets = ce_case(4, 40, torch.float32, triton_device)
    torch.library.opcheck(torch.ops.gpt2.cross_entropy.default,
                          (logits.requires_grad_(), targets))
    f = torch.compile(lambda x, t: gpu_kernels.cross_entropy(x, t).mean(), backend="aot_eager",
                      fullgraph=True)
    x = logits.detach().requires_grad_()
    f(x, targets).backward()
    _, want_grad = ce_reference(logits, targets, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=1e-6, rtol=1e-5)


def test_cross_entropy_bad_shapes_are_a_one_line_error():
    with pytest.raises(GPT2Error, match=r"do not fit \(N, V\)") as err:
        gpu_kernels.cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    assert "\n" not in str(err.value)
    with pytest.raises(GPT2Error, match="do not fit"):
        gpu_kernels.cross_entropy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(GPT2Error, match="do not fit"):  # float targets (probabilities)
        gpu_kernels.cross_entropy(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(GPT2Error, match="targets on meta"):  # (the operator's own check:
        # a meta tensor would take the operator to its shape-only implementation)
        gpu_kernels._check_rows(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long,
                                                               device="meta"))
