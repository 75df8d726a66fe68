"""Fast CPU inference: int8 quantization (both kernels) and packed bf16.

Oracles: the dequantized weights written out by hand (for the int8 layer), and
`transformers.GPT2LMHeadModel` in fp32 on the same random weights (for whole
models: logits error, greedy tokens).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt2.quantize as quantize
from gpt2 import cpu_kernels
from gpt2.errors import GPT2Error
from gpt2.model import GPT2
from gpt2.quantize import (
    Int8Linear,
    PackedBF16Linear,
    load_quantized,
    prepare_bf16,
    quantize_model,
    quantize_weight_int8,
    save_quantized,
)


def random_linear(n_in: int, n_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.bias.normal_(0, 0.3)
    return layer


def hf_logits(hf, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(idx).logits


def hf_greedy(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip


# -- the int8 layer ---------------------------------------------------------------------


def test_quantized_weight_is_within_half_a_step():
    w = random_linear(64, 32).weight
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    deq = q.float() * scale.float()[:, None]  # the format's definition, written out
    assert (deq - w).abs().le(scale.float()[:, None] / 2 + 1e-7).all()
    assert q.abs().max() <= 127
    # each row uses (nearly) its whole range: the scale fits that row's largest weight
    assert (q.abs().amax(dim=1) >= 126).all()


def int8_reference(layer: Int8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact product with the dequantized weight, the most the layer's rounding may add).

    The weights are the format's numbers written out (q * scale). The layer then rounds
    the activations: to bf16 (weight-only: 2^-8 relative per activation), or to 8 bits
    over each row's range (int8: at most half a step of 2 * max|x_row| / 255 per
    activation; 7 bits on CPUs without VNNI), and each such error is multiplied by |w|
    and summed.
    """
    w = layer.plain_weight().float() * layer.weight_scale.float()[:, None]  # (out, in)
    x = x.float()
    bias = None if layer.bias is None else layer.bias.float()
    exact = F.linear(x, w, bias)
    if layer.kernel == "int8":
        levels = 2**layer.activation_bits - 1  # 255, or 127 on CPUs without VNNI
        step = 2 * x.abs().amax(dim=-1, keepdim=True) / levels  # (..., 1)
        bound = (step / 2) * w.abs().sum(dim=1)  # (..., out)
    else:
        bound = 2 ** -8 * F.linear(x.abs(), w.abs())
    # plus the output's own rounding (bf16 for the weight-only kernel) and fp32 sums
    out_rounding = (2 ** -8 if layer.kernel == "bf16" else 1e-5) * (exact.abs() + bound)
    return exact, bound + out_rounding + 1e-5


@pytest.mark.parametrize("activations", ["int8", "bf16"])
@pytest.mark.parametrize(
    ("n_in", "n_out", "dtype"),
    [(64, 48, torch.float32), (48, 100, torch.bfloat16), (40, 24, torch.float32)],  # 40: fallback
)
def test_int8_linear_is_within_its_rounding_of_the_dequantized_product(
    n_in, n_out, dtype, activations
):
    linear = random_linear(n_in, n_out)
    layer = Int8Linear.from_linear(linear, bias_dtype=dtype, activations=activations)
    x = torch.randn(3, 5, n_in).to(dtype)
    x[0, 0] *= 1000  # one row far larger than the rest must not cost the others precision
    exact, bound = int8_reference(layer, x)
    out = layer(x)
    assert out.shape == (3, 5, n_out) and out.dtype == dtype
    err = (out.float() - exact).abs()
    assert (err <= bound + (2 ** -8 * exact.abs() if dtype == torch.bfloat16 else 0)).all()
    # and the bound is not vacuous: the result is close to the float layer's
    assert err.max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("activations", ["int8", "bf16"])
@pytest.mark.parametrize(("n_in", "n_out"), [(768, 2304), (3072, 768), (768, 50257)])
def test_int8_linear_at_124m_shapes(n_in, n_out, activations):
    layer = Int8Linear.from_weight(torch.randn(n_out, n_in) * 0.02, activations=activations)
    for rows in (1, 4):
        x = torch.randn(rows, n_in)
        exact, bound = int8_reference(layer, x)
        assert ((layer(x) - exact).abs() <= bound).all()


@pytest.mark.parametrize("activations", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [1, 32, 33, 300])  # above 32 rows: a bf16 matmul (prompts)
def test_int8_linear_at_every_row_count(rows, activations):
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1,
                                   activations=activations)  # fmt: skip
    x = torch.randn(rows, 64)
    exact, bound = int8_reference(layer, x)
    assert ((layer(x) - exact).abs() <= bound).all()


def test_int8_kernel_does_not_saturate():
    """Without VNNI, FBGEMM adds pairs of u8 x s8 products in int16: 255 * 127 * 2 overflows.

    Every weight at +-127 and every activation at the top of its range is the worst case.
    """
    q = torch.full((32, 256), 127, dtype=torch.int8)
    q[1::2] = -127
    layer = Int8Linear.from_quantized(q, torch.full((32,), 2.0 ** -7))
    for x in (torch.full((1, 256), 3.0), torch.rand(4, 256) * 5):
        exact, bound = int8_reference(layer, x)
        assert ((layer(x) - exact).abs() <= bound).all()


def test_int8_kernel_is_fbgemm_where_available():
    layer = Int8Linear.from_linear(random_linear(64, 32))
    want = "int8" if quantize.cpu_supports_int8_gemm() else "bf16"
    assert layer.kernel == want
    assert Int8Linear.from_linear(random_linear(64, 32), activations="bf16").kernel == "bf16"


def test_int8_without_fbgemm_runs_the_weight_only_kernel(monkeypatch):
    """CPUs without FBGEMM or our kernels (ARM) get the weight-only kernel, with its own
    accuracy."""
    monkeypatch.setattr(quantize, "cpu_supports_int8_gemm", lambda: False)
    monkeypatch.setattr(quantize.cpu_kernels, "kernel_for_int8", lambda *a: None)
    layer = Int8Linear.from_linear(random_linear(64, 32))
    assert layer.kernel == "bf16"
    x = torch.randn(3, 64)
    exact, bound = int8_reference(layer, x)
    assert ((layer(x) - exact).abs() <= bound).all()


def test_int8_linear_follows_load_state_dict():
    """FBGEMM keeps its own packed copy of the weight; loading new weights must refresh it."""
    a, b = Int8Linear.from_linear(random_linear(64, 32, seed=0)), random_linear(64, 32, seed=1)
    a.load_state_dict(Int8Linear.from_linear(b).state_dict())
    x = torch.randn(2, 64)
    exact, bound = int8_reference(a, x)
    assert ((a(x) - exact).abs() <= bound).all()
    assert (a(x) - b(x)).abs().max() <= 0.05 * b(x).abs().max()


def test_int8_linear_follows_a_cast_and_packs_once_otherwise(monkeypatch):
    """The kernel's copy is rebuilt when a move or cast changes the tensors (here the
    bias, cast to bf16), and not when it changes nothing (`.to` the device it is on):
    loading an int8 124M packed every layer three times, and its peak memory followed."""
    layer = Int8Linear.from_linear(random_linear(64, 32))
    packs = []
    monkeypatch.setattr(Int8Linear, "pack", lambda self: packs.append(1) or real_pack(self))
    layer.to("cpu").cpu()
    assert packs == []
    layer.to(torch.bfloat16)
    assert packs == [1] and layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64)
    exact, bound = int8_reference(layer, x)
    assert ((layer(x) - exact).abs() <= bound + 2 ** -8 * exact.abs()).all()  # a bf16 bias


def test_loading_an_int8_checkpoint_packs_each_layer_once(hf_checkpoint, tmp_path,
                                                          monkeypatch):
    folder = save_quantized(quantize_model(GPT2.from_pretrained(hf_checkpoint().folder),
                                           "int8"), tmp_path / "int8")
    packs = []
    monkeypatch.setattr(Int8Linear, "pack", lambda self: packs.append(1) or real_pack(self))
    model = GPT2.from_pretrained(folder)
    assert len(packs) == sum(isinstance(m, Int8Linear) for m in model.modules())


real_pack = Int8Linear.pack


# -- whole models against transformers ----------------------------------------------------


@pytest.mark.parametrize(("method", "tolerance"), [("int8", 0.3), ("int8-weight-only", 0.15)])
def test_int8_model_logits_close_to_fp32(hf_checkpoint, method, tolerance):
    ckpt = hf_checkpoint()
    idx = torch.randint(0, ckpt.config.n_vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(ckpt.model, idx)  # (2, 12, V) fp32
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), method)
    with torch.no_grad():
        out = model(idx)
    err = (out - ref).abs()
    # max error / ref std over three seeds of this 64-wide random model: 0.09-0.11 with
    # bf16 activations, 0.10-0.20 with int8 ones (a row of 64 activations is coarse on
    # an 8-bit grid); the trained-model figures are in bench/cpu_decode.py --quality
    assert err.max().item() <= tolerance * ref.std().item(), err.max().item()
    # wherever fp32's top-1 leads by more than twice the error, int8 must pick it too
    top2 = ref.topk(2, dim=-1).values  # (2, 12, 2)
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err.amax(-1)
    assert clear.sum().item() >= 8  # of 24 positions: the check below is not vacuous
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, None])
def test_int8_model_decoding_through_its_cache_close_to_fp32(hf_checkpoint, kv_dtype,
                                                             monkeypatch, tmp_path):  # fmt: skip
    """An int8 model keeps its KV cache in bf16 on CPUs with native bf16 (also when
    loaded from a saved int8 checkpoint); fed through that cache a few positions at a
    time, as decoding feeds it, its logits stay as close to transformers' as above."""
    monkeypatch.setattr(quantize, "INT8_KV_CACHE_DTYPE", kv_dtype)
    ckpt = hf_checkpoint()
    idx = torch.randint(0, ckpt.config.n_vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(ckpt.model, idx)  # (2, 12, V) fp32
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), "int8")
    save_quantized(model, tmp_path / "int8")
    expected = kv_dtype if kv_dtype and quantize.cpu_supports_bf16() else torch.float32
    for m in (model, load_quantized(tmp_path / "int8")):
        cache = m.new_cache(2, max_len=12)
        assert cache.k.dtype == cache.v.dtype == expected
        with torch.no_grad():
            out = torch.cat([m(idx[:, i:i + 3], cache=cache) for i in range(0, 12, 3)], dim=1)
        assert out.dtype == torch.float32
        err = (out - ref).abs()
        assert err.max().item() <= 0.3 * ref.std().item(), err.max().item()
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * err.amax(-1)
        assert clear.sum().item() >= 8
        assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert GPT2.from_pretrained(ckpt.folder).new_cache(1).k.dtype == torch.float32


def test_int8_lm_head_is_quantized_and_used(hf_checkpoint):
    """Needs GPT2.lm_head (see gpt2.quantize): the head is a third of 124M's bytes."""
    ckpt = hf_checkpoint()
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), "int8")
    assert model.quantization["lm_head"] is True
    assert isinstance(model.lm_head, Int8Linear)
    x = torch.randn(1, 3, ckpt.config.n_embd)
    head = model.lm_head.weight.float() * model.lm_head.weight_scale.float()[:, None]
    # the embedding lookup reads the head's own int8 rows (no float copy of the table)
    assert model.wte.weight is model.lm_head.weight
    ids = torch.tensor([[0, 5, ckpt.config.n_vocab - 1]])
    assert torch.equal(model.wte(ids), head[ids])
    ref = F.linear(model.ln_f(x).to(torch.bfloat16).float(), head)
    with torch.no_grad():
        out = model.lm_head(model.ln_f(x))
    assert (out - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


def clear_margin_prompts(hf, n_vocab: int, *, rows: int, min_margin: float) -> tuple:
    """Prompts (rows, 6) along whose fp32 greedy path (16 tokens) the top token always leads
    the second by >= min_margin, and that path (rows, 22).

    A random-weight model has near-ties (margins of 0.005 in logits of std 1.6), where
    any rounding may flip the choice and the paths then part for good; the claim
    under test is that reduced precision keeps every choice that fp32 makes clearly.
    The prompts are chosen by fp32's margins alone, never by our output.
    """
    idx = torch.randint(0, n_vocab, (256, 6), generator=torch.Generator().manual_seed(0))
    path = hf_greedy(hf, idx, 16)  # (256, 22)
    logits = hf_logits(hf, path)[:, 5:-1]  # (256, 16, V): the logits each choice was made on
    top2 = logits.topk(2, dim=-1).values
    ok = ((top2[..., 0] - top2[..., 1]) >= min_margin).all(dim=1)  # (256,)
    assert ok.sum() >= rows, f"only {int(ok.sum())} prompts have clear margins"
    return idx[ok][:rows], path[ok][:rows]


@pytest.mark.parametrize(
    ("precision", "n_embd", "min_margin"),
    # int8 activations round each row to 8 bits, a coarser step than bf16's: the claim is
    # made where fp32 leads by 0.3 (logits of std ~1.5), on a model wide enough to have
    # four such prompts
    [("bf16", 64, 0.1), ("int8-weight-only", 64, 0.1), ("int8", 128, 0.3)],
)
def test_greedy_equals_fp32_for_16_tokens_where_margins_are_clear(
    hf_checkpoint, precision, n_embd, min_margin
):
    ckpt = hf_checkpoint(n_embd=n_embd)
    idx, want = clear_margin_prompts(
        ckpt.model, ckpt.config.n_vocab, rows=4, min_margin=min_margin
    )
    model = GPT2.from_pretrained(ckpt.folder)
    model = prepare_bf16(model) if precision == "bf16" else quantize_model(model, precision)
    got = model.generate(idx, max_new_tokens=16, temperature=0.0)
    assert got.tolist() == want.tolist()


def test_bf16_logits_close_to_fp32(hf_checkpoint):
    ckpt = hf_checkpoint()
    idx = torch.randint(0, ckpt.config.n_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    model = prepare_bf16(GPT2.from_pretrained(ckpt.folder))
    assert isinstance(model.h[0].attn.c_attn, PackedBF16Linear)
    ref = hf_logits(ckpt.model, idx)
    with torch.no_grad():
        err = (model(idx).float() - ref).abs().max().item()
    # bf16 keeps 8 bits of mantissa in every activation; measured max 0.06 x ref std
    assert err <= 0.1 * ref.std().item(), err


def test_a_bf16_checkpoint_loads_with_the_packed_layers(hf_checkpoint, tmp_path):
    """Stored bf16 and loaded as stored (no dtype): packed like dtype="bf16" where the CPU
    has native bf16 (plain bf16 F.linear ran at fp32's speed), fp32 elsewhere (below)."""
    from gpt2.weights.huggingface import save_huggingface

    ckpt = hf_checkpoint()
    float_model = GPT2.from_pretrained(ckpt.folder)
    save_huggingface(float_model.state_dict(), float_model.config, tmp_path / "bf16",
                     dtype=torch.bfloat16)
    model = GPT2.from_pretrained(tmp_path / "bf16")
    assert model.wte.weight.dtype == torch.bfloat16
    packed = isinstance(model.h[0].attn.c_attn, PackedBF16Linear)
    assert packed == quantize.cpu_supports_bf16()  # (else fp32: the test below)
    idx = torch.randint(0, ckpt.config.n_vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(ckpt.model, idx)
    with torch.no_grad():
        err = (model(idx).float() - ref).abs().max().item()
    assert err <= 0.1 * ref.std().item(), err  # as test_bf16_logits_close_to_fp32
    assert GPT2.from_pretrained(tmp_path / "bf16", dtype="fp32").wte.weight.dtype == torch.float32
    # quantized: fp32 activations between the int8 layers (their kernels take fp32 rows)
    int8 = GPT2.from_pretrained(tmp_path / "bf16", quantize="int8")
    assert int8.ln_f.weight.dtype == torch.float32 and int8.quantization


@pytest.mark.parametrize("stored, native_bf16", [
    (torch.float16, quantize.cpu_supports_bf16()),  # fp16 is emulated on every CPU we run on
    (torch.bfloat16, False),  # a CPU without AVX512-BF16 or AMX
])
def test_half_precision_a_cpu_emulates_loads_as_fp32(hf_checkpoint, tmp_path, monkeypatch,
                                                    stored, native_bf16):
    """With no dtype asked for, weights stored in a half precision this CPU only emulates
    (slower than fp32) run in fp32; asked for, they run as asked; `gpt2 validate`
    reports them as stored."""
    from gpt2.commands.validate import describe
    from gpt2.weights.huggingface import save_huggingface

    monkeypatch.setattr(quantize, "cpu_supports_bf16", lambda: native_bf16)
    ckpt = hf_checkpoint()
    float_model = GPT2.from_pretrained(ckpt.folder)
    save_huggingface(float_model.state_dict(), float_model.config, tmp_path / "half",
                     dtype=stored)
    model = GPT2.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(isinstance(m, PackedBF16Linear) for m in model.modules())
    # the stored weights, exactly: transformers holding them, upcast, is the oracle
    hf = ckpt.model.__class__.from_pretrained(tmp_path / "half", dtype=torch.float32)
    idx = torch.randint(0, ckpt.config.n_vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_logits(hf, idx), atol=1e-4, rtol=0)
    if stored == torch.float16:
        assert GPT2.from_pretrained(tmp_path / "half", dtype="fp16").wte.weight.dtype == stored
    # quantized: fp32 activations between the int8 layers, whatever the stored precision
    int8 = GPT2.from_pretrained(tmp_path / "half", quantize="int8")
    assert int8.ln_f.weight.dtype == torch.float32 and int8.quantization
    kept = GPT2._load(tmp_path / "half", size=None, dtype=None, device="cpu", quantize=None,
                      fp32_where_emulated=False)
    assert {t["dtype"] for t in describe(kept)["tensors"]} == {str(stored).split(".")[1]}


@pytest.mark.parametrize("shape", [(4, 64), (1, 1, 64)])  # several rows: oneDNN; one: mv
def test_packed_bf16_linear_equals_plain_bf16_linear(shape):
    linear = random_linear(64, 96)
    layer = PackedBF16Linear.from_linear(linear)
    x = torch.randn(*shape).to(torch.bfloat16)
    ref = F.linear(x.float(), linear.weight.to(torch.bfloat16).float(),
                   linear.bias.to(torch.bfloat16).float())  # fmt: skip
    assert (layer(x).float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


def test_packed_bf16_linear_follows_load_state_dict():
    layer, other = PackedBF16Linear.from_linear(random_linear(64, 96)), random_linear(64, 96, 1)
    layer.load_state_dict(PackedBF16Linear.from_linear(other).state_dict())
    x = torch.randn(4, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), other.weight.to(torch.bfloat16).float(),
                   other.bias.to(torch.bfloat16).float())  # fmt: skip
    assert (layer(x).float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


def test_bf16_needs_native_support(monkeypatch, hf_checkpoint):
    monkeypatch.setattr(quantize, "cpu_supports_bf16", lambda: False)
    model = GPT2.from_pretrained(hf_checkpoint().folder)
    with pytest.raises(GPT2Error, match="no native bfloat16") as e:
        prepare_bf16(model)
    assert "\n" not in str(e.value)


# -- saved int8 checkpoints ---------------------------------------------------------------


def test_save_load_round_trip_does_not_requantize(hf_checkpoint, tmp_path, monkeypatch):
    ckpt = hf_checkpoint()
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), "int8")
    folder = save_quantized(model, tmp_path / "int8")

    def refuse(*args, **kwargs):
        raise AssertionError("loading an int8 checkpoint must not quantize again")

    monkeypatch.setattr(quantize, "quantize_weight_int8", refuse)
    monkeypatch.setattr(Int8Linear, "from_weight", refuse)
    loaded = load_quantized(folder)
    # (state_dict: on AMX a block's int8 weight lives in its kernel's tiles, and the
    # buffer is a placeholder; the state dict holds the weight as stored)
    saved = model.state_dict()
    for name, t in loaded.state_dict().items():
        if t.dtype == torch.int8:
            assert torch.equal(t, saved[name]), name
    assert sum(t.dtype == torch.int8 for t in loaded.state_dict().values()) \
        >= 4 * ckpt.config.n_layer
    idx = torch.randint(0, ckpt.config.n_vocab, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.quantization == model.quantization


def test_int8_checkpoint_is_a_quarter_of_fp32(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint(n_embd=128, n_vocab=512)
    model = quantize_model(GPT2.from_pretrained(ckpt.folder), "int8")
    folder = save_quantized(model, tmp_path / "int8")
    fp32 = (ckpt.folder / "model.safetensors").stat().st_size
    assert (folder / "model-int8.safetensors").stat().st_size < 0.35 * fp32


def test_transformers_refuses_an_int8_checkpoint_and_ours_reads_the_old_name(
        hf_checkpoint, tmp_path):
    """transformers would load the int8 values as float weights (it ignores the scales
    and config.json's "quantization"): the weights file has a name it does not look for.
    A checkpoint saved before that (model.safetensors) still loads here."""
    from transformers import GPT2LMHeadModel

    model = quantize_model(GPT2.from_pretrained(hf_checkpoint().folder), "int8")
    folder = save_quantized(model, tmp_path / "int8")
    with pytest.raises(OSError):
        GPT2LMHeadModel.from_pretrained(folder)
    (folder / "model-int8.safetensors").rename(folder / "model.safetensors")
    idx = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_quantized(folder)(idx), model(idx))
    # it runs in its own precision: another dtype is refused, not silently ignored
    with pytest.raises(GPT2Error, match="int8 checkpoint, which runs in its own precision"):
        GPT2.from_pretrained(folder, dtype="fp16")
    with pytest.raises(GPT2Error, match="int8 checkpoint, which runs in its own precision"):
        GPT2.from_pretrained(folder, dtype="fp32")


def test_truncated_int8_checkpoint_is_a_clear_error(hf_checkpoint, tmp_path):
    model = quantize_model(GPT2.from_pretrained(hf_checkpoint().folder), "int8")
    folder = save_quantized(model, tmp_path / "int8")
    data = (folder / "model-int8.safetensors").read_bytes()
    (folder / "model-int8.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GPT2Error, match="model-int8.safetensors") as e:
        load_quantized(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"bits": 4}, "with 8 bits only"),
    ({"method": "gptq"}, "unknown quantization"),
    ({"version": 2}, "format version 2 is not one this gpt2 reads"),
    ({"version": "1"}, "format version '1' is not one"),
])
def test_int8_checkpoint_of_another_format_is_refused(hf_checkpoint, tmp_path, change, message):
    """A "quantization" entry this version does not write is refused, not read as its own."""
    model = quantize_model(GPT2.from_pretrained(hf_checkpoint().folder), "int8")
    folder = save_quantized(model, tmp_path / "int8")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] |= change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GPT2Error, match=message) as e:
        GPT2.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_unknown_method_is_a_clear_error(hf_checkpoint):
    model = GPT2.from_pretrained(hf_checkpoint().folder)
    with pytest.raises(GPT2Error, match="unknown quantization 'int3'"):
        quantize_model(model, "int3")


@pytest.mark.parametrize("precision", ["int8", "int8-weight-only", "bf16"])
def test_quantized_and_bf16_models_count_the_same_parameters_as_float(hf_checkpoint,
                                                                      precision):
    """The fp32 count is checked against transformers' in test_model. A bf16 model's LM
    head is another tensor object over wte's memory: still one weight."""
    model = GPT2.from_pretrained(hf_checkpoint().folder)
    n = model.num_parameters()
    other = prepare_bf16(model) if precision == "bf16" else quantize_model(model, precision)
    assert other.num_parameters() == n


@pytest.mark.parametrize("native_bf16", [True, False])
def test_prompts_use_a_bf16_matmul_only_where_bf16_is_native(monkeypatch, native_bf16):
    """Many rows: a bf16 matmul on the widened weights, unless bf16 is emulated (then the
    int8 kernel, whose cost grows with the rows but stays native)."""
    monkeypatch.setattr(quantize, "cpu_supports_bf16", lambda: native_bf16)
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    layer = Int8Linear.from_linear(random_linear(64, 32), activations="bf16")
    x = torch.randn(cpu_kernels.AMX_BF16_MAX_ROWS + 1, 64)  # more rows than our kernels take
    exact, bound = int8_reference(layer, x)
    assert ((layer(x) - exact).abs() <= bound).all()
    assert bool(calls) is not native_bf16


# --------------------------------------------------------------------------- tiles only (AMX)

needs_amx = pytest.mark.skipif(not cpu_kernels.amx_available(),
                               reason="tiles-only layers exist where the AMX kernels run")


def _tiles_only_models(hf_checkpoint):
    """(float model, [(name, tiles-only model)]): bf16, int8 and int8-weight-only from
    the same weights."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=21)
    fp32 = GPT2.from_pretrained(ckpt.folder).eval()
    return fp32, [("bf16", GPT2.from_pretrained(ckpt.folder, dtype="bf16").eval()),
                  ("int8", GPT2.from_pretrained(ckpt.folder, quantize="int8").eval()),
                  ("int8-weight-only", GPT2.from_pretrained(
                      ckpt.folder, quantize="int8-weight-only").eval())]


@needs_amx
def test_tiles_only_layers_keep_their_weight_only_in_the_tiles(hf_checkpoint):
    """A block's projection lets its weight as stored go (a meta placeholder); the state
    dict rebuilds it from the tiles exactly: bf16 as the float weight rounded, int8 as
    the weight quantized anew (quantize_weight_int8 on the float weight)."""
    fp32, models = _tiles_only_models(hf_checkpoint)
    float_state = fp32.state_dict()
    for kind, model in models:
        layer = model.h[0].mlp.c_fc
        assert layer._buffers["weight"].is_meta, kind
        state = model.state_dict()
        for i in range(2):
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                key = f"h.{i}.{name}.weight"
                w = float_state[key]
                expected = w.to(torch.bfloat16) if kind == "bf16" else quantize_weight_int8(w)[0]
                assert torch.equal(state[key], expected), (kind, key)
        assert model.num_parameters() == fp32.num_parameters(), kind
        # the LM head's weight is wte's: never let go
        assert not model.wte.weight.is_meta and not model.lm_head._buffers["weight"].is_meta


@needs_amx
def test_tiles_only_models_copy_pickle_reload_and_cast(hf_checkpoint, tmp_path):
    """Every way a model's tensors are read back gives the same logits."""
    import copy

    fp32, models = _tiles_only_models(hf_checkpoint)
    idx = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = fp32(idx)
        for kind, model in models:
            before = model(idx)
            twin = copy.deepcopy(model)
            assert twin.h[1].attn.c_proj._buffers["weight"].is_meta, kind  # let go again
            assert torch.equal(twin(idx), before), kind
            torch.save(model, tmp_path / f"{kind}.pt")
            again = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
            assert torch.equal(again(idx), before), kind
            model.load_state_dict(model.state_dict())
            assert torch.equal(model(idx), before), kind
            if kind == "bf16":  # cast back up: the weights as bf16 holds them
                wide = copy.deepcopy(model).float()
                assert not wide.h[0].mlp.c_fc.weight.is_meta
                torch.testing.assert_close(wide(idx), reference, atol=0.1, rtol=0.05)


@needs_amx
def test_tiles_only_layer_rebuilds_the_weight_for_rows_past_its_kernel(hf_checkpoint):
    fp32, models = _tiles_only_models(hf_checkpoint)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    for kind, model in models:
        layer = model.h[0].mlp.c_fc
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        with torch.no_grad():
            through_kernel = layer(x.to(dtype)).float()
            layer._native = layer._native._replace(max_rows=2)  # 6 rows: past the kernel
            fallback = layer(x.to(dtype)).float()
        torch.testing.assert_close(fallback, through_kernel, atol=0.05, rtol=0.02)


@needs_amx
def test_int8_weight_only_amx_kernel_takes_a_long_prompt_in_blocks():
    """Past the 256 rows the AMX kernel takes in one call, it runs 256 at a time: the
    result is the kernel's on each block, and the exact product's within its bound."""
    layer = Int8Linear.from_linear(random_linear(64, 32), activations="bf16")
    layer.tiles_only()
    assert layer._buffers["weight"].is_meta  # the tiles hold it all: no plain copy
    n = cpu_kernels.AMX_INT8WO_MAX_ROWS
    x = torch.randn(2 * n + 37, 64, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    exact, bound = int8_reference(layer, x)
    assert ((y - exact).abs() <= bound).all()
    op = torch.ops.gpt2.int8wo_linear_amx
    for i in range(0, x.size(0), n):
        assert torch.equal(y[i:i + n], op(x[i:i + n], *layer._native.args))


def test_a_layer_pickled_before_tiles_only_existed_still_loads():
    """Its state has no `_tiles_only`: it unpickles as a layer that keeps its weight."""
    layer = Int8Linear.from_linear(random_linear(64, 32))
    state = layer.__getstate__()
    del state["_tiles_only"]
    old = Int8Linear.__new__(Int8Linear)
    old.__setstate__(state)
    x = torch.randn(3, 64)
    assert not old._buffers["weight"].is_meta
    assert torch.equal(old(x), layer(x))


@pytest.mark.parametrize(("load", "cast"), [({"quantize": "int8"}, "half"),
                                            ({"quantize": "int8"}, "bfloat16"),
                                            ({"dtype": "bf16"}, "half")])
def test_a_cast_of_a_model_with_kernel_copies_is_refused_in_one_line(hf_checkpoint, load, cast):
    """.half() of an int8 model raised "mixed dtype (CPU)" at its first forward, and of a
    bf16 one on a CPU without AVX512-FP16 a oneDNN error; moves still work."""
    from gpt2 import GPT2

    model = GPT2.from_pretrained(hf_checkpoint().folder, **load)
    idx = torch.tensor([[1, 2, 3]])
    if not any(isinstance(m, quantize._KernelCopy) for m in model.modules()):
        # bf16 on a CPU without native bf16 runs fp32 layers: a cast is an ordinary one
        assert load.get("dtype") == "bf16"
        assert torch.isfinite(getattr(model, cast)().float()(idx)).all()
        return
    with pytest.raises(GPT2Error, match="so its dtype is fixed when it loads; load it again"):
        getattr(model, cast)()
    assert torch.isfinite(model.to("cpu")(idx)).all()  # (a move is fine, and nothing broke)


@pytest.mark.parametrize("load", [{"quantize": "int8"}, {"quantize": "int8-weight-only"},
                                  {"dtype": "bf16"}])
def test_training_a_model_packed_for_inference_is_refused(hf_checkpoint, load):
    """A packed model's projection weights are buffers and its kernels pass no gradient:
    training it ran, changing nothing (0 of the projections got a gradient). In training
    mode with grad on, its forward refuses in one line; in evaluation mode, or under
    no_grad, it runs."""
    from gpt2 import GPT2

    model = GPT2.from_pretrained(hf_checkpoint().folder, **load)
    idx = torch.tensor([[1, 2, 3]])
    if not model._packed_for_inference():
        # bf16 on a CPU without native bf16 runs plain fp32 layers, which train
        assert load.get("dtype") == "bf16"
        model.train()
        model(idx).sum().backward()
        assert model.h[0].mlp.c_fc.weight.grad is not None
        return
    model.train()
    with pytest.raises(GPT2Error, match="packed for inference .* cannot be trained"):
        model(idx)
    with torch.no_grad():
        assert torch.isfinite(model(idx)).all()
    model.eval()
    assert torch.isfinite(model(idx)).all()
