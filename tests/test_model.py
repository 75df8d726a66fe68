"""Our GPT-2 against Hugging Face's `GPT2LMHeadModel` holding the same random weights.

The weights are written by `transformers` (`save_pretrained`) and read by our
`GPT2.from_pretrained`, so these tests also cover the Hugging Face reader; the
oracle for every number is transformers' eager (written-out) attention. Three
levels of parity (minGPT's test): logits close, loss equal, greedy ids equal;
for a tiny config and for the width and heads of every released size.
"""

from __future__ import annotations

import importlib.util
import io
import re

import pytest
import torch
import torch.nn.functional as F

import gpt2.products
from gpt2.config import PRESETS, GPT2Config
from gpt2.errors import GPT2Error
from gpt2.model import GPT2

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
# float32 sums round relative to their size: random weights of the big geometries give
# losses near 40, where one rounding step is ~4e-6 (seen 1.1e-5 apart at 1558M)
LOSS_RTOL = 1e-6


def random_ids(n_vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n_vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(idx, **kwargs).logits  # (B, T, n_vocab)


def hf_greedy(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full recomputation: the plainest possible oracle."""
    for _ in range(n):
        # logits_to_keep=1: only the last position goes through the (big) LM head
        nxt = hf_logits(hf, idx, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@torch.no_grad()
def our_greedy(model: GPT2, idx: torch.Tensor, n: int) -> torch.Tensor:
    """model.generate(temperature=0) where gpt2.generate exists; else a loop over the KV cache."""
    if importlib.util.find_spec("gpt2.generate") is not None:
        return model.generate(idx, max_new_tokens=n, temperature=0.0)
    cache = model.new_cache(idx.size(0), idx.size(1) + n)
    logits = model(idx, cache=cache, last_only=True)  # (B, 1, n_vocab)
    out = idx
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out = torch.cat([out, nxt], dim=1)
        logits = model(nxt, cache=cache)
    return out


def assert_parity(model: GPT2, hf, idx: torch.Tensor, new_tokens: int) -> None:
    with torch.no_grad():
        ours = model(idx)  # (B, T, V)
        theirs = hf(idx, labels=idx)  # HF shifts the labels itself
    diff = (ours - theirs.logits).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff}"
    loss = F.cross_entropy(ours[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).item()
    assert loss == pytest.approx(theirs.loss.item(), rel=LOSS_RTOL, abs=LOSS_ATOL)
    assert torch.equal(our_greedy(model, idx, new_tokens), hf_greedy(hf, idx, new_tokens))


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=1)
    return GPT2.from_pretrained(ckpt.folder), ckpt.model


def test_tiny_matches_transformers(tiny):
    model, hf = tiny
    assert_parity(model, hf, random_ids(128, (3, 12)), new_tokens=12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"position_ids": torch.tensor([[0, 1, 500]])}, "position 500 is out of range"),
    ({"position_ids": torch.tensor([[0, -1, 2]])}, "position -1 is out of range"),
    ({"position_ids": torch.tensor([0, 1])}, "position_ids must be an integer tensor (2 or 1, 3)"),
    ({"position_ids": torch.tensor([[0.0, 1.0, 2.0]])}, "position_ids must be an integer"),
    ({"attention_mask": [[1, 1, 1], [1, 1, 1]]}, "attention_mask must be a tensor (2, positions)"),
    ({"attention_mask": torch.tensor([[0.5, 1, 1], [1, 1, 1]])}, "must hold only 1 (a token)"),
    ({"attention_mask": torch.tensor([[2, 1, 1], [1, 1, 1]])}, "must hold only 1 (a token)"),
    ({"cache": 5}, "cache must be a KVCache (model.new_cache(batch, ...)), not int"),
    ({"last_only": "no"}, "last_only must be True or False, got 'no'"),
])
def test_forward_arguments_are_checked(tiny, kwargs, message):
    """Each was an IndexError, RuntimeError or AttributeError from inside torch, or (a mask
    of 0.5 or 2) was read as 1 without a word."""
    model, _ = tiny
    with pytest.raises(GPT2Error, match=re.escape(message)):
        model(random_ids(128, (2, 3)), **kwargs)


def test_ids_of_any_integer_type_give_the_same_logits(tiny):
    model, _ = tiny
    idx = random_ids(128, (2, 5))
    with torch.no_grad():
        expected = model(idx)
        for dtype in (torch.uint8, torch.int16, torch.int32):
            assert torch.equal(model(idx.to(dtype)), expected)


# The width and heads of each released size, with fewer layers to keep the test fast;
# 124M is whole. n_ctx is cut to 64: wpe's length changes no arithmetic per position.
GEOMETRIES = {
    "124M": dict(n_layer=12, n_embd=768, n_head=12),
    "355M": dict(n_layer=2, n_embd=1024, n_head=16),
    "774M": dict(n_layer=1, n_embd=1280, n_head=20),
    "1558M": dict(n_layer=1, n_embd=1600, n_head=25),
}


@pytest.mark.parametrize("size", list(GEOMETRIES))
def test_released_geometry_matches_transformers(size, hf_checkpoint):
    preset = PRESETS[size]
    geometry = GEOMETRIES[size]
    assert (geometry["n_embd"], geometry["n_head"]) == (preset.n_embd, preset.n_head)
    ckpt = hf_checkpoint(**geometry, n_vocab=50257, n_ctx=64, seed=2, cache_result=False)
    model = GPT2.from_pretrained(ckpt.folder)
    assert model.config.head_size == preset.head_size
    assert_parity(model, ckpt.model, random_ids(50257, (1, 10), seed=3), new_tokens=3)


def test_math_attention_equals_sdpa(tiny):
    model, _ = tiny
    idx = random_ids(128, (2, 20), seed=4)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding exercises the masked SDPA branch too
    try:
        with torch.no_grad():
            sdpa = [model(idx), model(idx, attention_mask=mask), _decode_steps(model, idx)]
            model.set_attention("math")
            math = [model(idx), model(idx, attention_mask=mask), _decode_steps(model, idx)]
    finally:
        model.set_attention("sdpa")
    for a, b in zip(sdpa, math, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _decode_steps(model: GPT2, idx: torch.Tensor) -> torch.Tensor:
    """Logits from a prefill of 8 tokens then one token at a time through the cache."""
    cache = model.new_cache(idx.size(0), idx.size(1))
    steps = [model(idx[:, :8], cache=cache)]  # (B, 8, V)
    for t in range(8, idx.size(1)):
        steps.append(model(idx[:, t : t + 1], cache=cache))  # (B, 1, V)
    return torch.cat(steps, dim=1)  # (B, T, V)


def test_kv_cache_equals_full_recompute(tiny):
    model, hf = tiny
    idx = random_ids(128, (2, 24), seed=5)
    with torch.no_grad():
        full = model(idx)
        cached = _decode_steps(model, idx)
        # a second chunk of several tokens after the cache (not one at a time)
        cache = model.new_cache(2, 24)
        chunks = torch.cat([model(idx[:, :10], cache=cache), model(idx[:, 10:], cache=cache)], 1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)
    assert (full - hf_logits(hf, idx)).abs().max() <= LOGITS_ATOL


def test_gradients_flow_through_the_kv_cache(tiny):
    """A loss over logits made in three cached calls (with autograd on) backpropagates,
    to the gradients transformers gives for the same loss over one full forward (the
    cache's in-place writes had broken the first calls' graphs: "modified by an inplace
    operation"). A call without autograd afterwards still sees every position."""
    model, hf = tiny
    idx = random_ids(128, (2, 12), seed=8)
    cache = model.new_cache(2, 13)
    logits = torch.cat([model(idx[:, :5], cache=cache), model(idx[:, 5:6], cache=cache),
                        model(idx[:, 6:], cache=cache)], dim=1)  # (2, 12, V)
    model.zero_grad()
    (logits.float() ** 2).mean().backward()
    hf.zero_grad()
    (hf(idx).logits ** 2).mean().backward()
    ours = {"wte": model.wte.weight.grad, "ln_f": model.ln_f.weight.grad,
            "h.0.ln_1": model.h[0].ln_1.weight.grad}
    theirs = {"wte": hf.transformer.wte.weight.grad, "ln_f": hf.transformer.ln_f.weight.grad,
              "h.0.ln_1": hf.transformer.h[0].ln_1.weight.grad}
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        last = model(random_ids(128, (2, 1), seed=9), cache=cache)[:, -1]
        full = model(torch.cat([idx, random_ids(128, (2, 1), seed=9)], 1))[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    model.zero_grad()
    hf.zero_grad()


def test_parameter_count_of_every_size():
    from transformers import GPT2LMHeadModel

    from conftest import hf_config_for

    with torch.device("meta"):  # shapes only: no memory, no time
        assert GPT2(PRESETS["124M"]).num_parameters() == 124_439_808
        for size, config in PRESETS.items():
            hf = GPT2LMHeadModel(hf_config_for(config))
            # HF counts the tied lm_head once too
            assert GPT2(config).num_parameters() == hf.num_parameters(), size


def test_too_long_input_is_a_clear_error(tiny):
    model, _ = tiny
    n_ctx = model.config.n_ctx
    with pytest.raises(GPT2Error, match=f"{n_ctx + 1} tokens.*context is {n_ctx}"):
        model(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, n_ctx - 2, dtype=torch.long), cache=cache)
    with pytest.raises(GPT2Error, match="context"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_token_id_out_of_range_is_a_clear_error(tiny):
    """On a CPU, instead of the embedding's IndexError ("index out of range in self")."""
    model, _ = tiny
    V = model.config.n_vocab
    for bad, shown in ((V, V), (-1, -1), (V + 1000, V + 1000)):
        with pytest.raises(GPT2Error, match=f"token id {shown} is out of range: this model "
                                            f"has ids 0 to {V - 1}"):
            model(torch.tensor([[1, bad, 2]]))
    assert model(torch.tensor([[0, V - 1]])).shape == (1, 2, V)


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, attention_mask, position_ids), each (B, T), rows padded on the left with 0."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens count from 0
    return idx, mask, positions


def test_padded_batch_equals_unpadded_rows(tiny):
    model, hf = tiny
    rows = [random_ids(128, (n,), seed=10 + n) for n in (11, 4, 8)]
    idx, mask, positions = _left_pad(rows)
    with torch.no_grad():
        padded = model(idx, attention_mask=mask, position_ids=positions)  # (B, T, V)
    for i, r in enumerate(rows):
        alone = hf_logits(hf, r[None])[0]  # (len, V): the oracle, no padding at all
        diff = (padded[i, -len(r) :] - alone).abs().max().item()
        assert diff <= LOGITS_ATOL, f"row {i} differs by {diff}"


def test_padded_batch_decodes_like_unpadded_rows(tiny):
    """Left-padded prefill, then greedy steps through the cache with the mask extended."""
    model, hf = tiny
    rows = [random_ids(128, (n,), seed=20 + n) for n in (9, 3, 6)]
    idx, mask, positions = _left_pad(rows)
    new = 6
    cache = model.new_cache(len(rows), idx.size(1) + new)
    out = []
    with torch.no_grad():
        logits = model(idx, attention_mask=mask, position_ids=positions, cache=cache)
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(nxt, attention_mask=mask, position_ids=positions, cache=cache)
    ours = torch.cat(out, dim=1)  # (B, new)
    for i, r in enumerate(rows):
        expected = hf_greedy(hf, r[None], new)[0, len(r) :]
        assert torch.equal(ours[i], expected), f"row {i}"


def test_bf16_weights_stay_close(tiny, hf_checkpoint):
    """Loading with dtype=bf16 gives bf16 parameters whose logits stay near fp32's."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=1)
    model = GPT2.from_pretrained(ckpt.folder, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    idx = random_ids(128, (1, 16), seed=7)
    with torch.no_grad():
        diff = (model(idx).float() - hf_logits(ckpt.model, idx)).abs().max().item()
    assert diff < 0.25  # bf16 keeps 8 bits of mantissa; logits here are of size ~5


def test_config_rejects_impossible_geometry():
    with pytest.raises(GPT2Error, match="divisible"):
        GPT2Config(n_embd=64, n_head=5)


@pytest.mark.parametrize("field, value, message", [
    ("n_layer", True, "n_layer must be a positive integer, got True"),  # bool is an int
    ("n_head", 2.0, "n_head must be a positive integer"),
    ("dropout", "x", "dropout must be a number in \\[0, 1\\), got 'x'"),
    ("dropout", True, "dropout must be a number"),
    ("dropout", 1.0, "dropout must be a number in \\[0, 1\\), got 1.0"),
])
def test_config_rejects_values_of_the_wrong_type(field, value, message):
    with pytest.raises(GPT2Error, match=message):
        GPT2Config(**{field: value})


# -- the oneDNN copies used for batched CPU decoding ----------------------------------


@pytest.mark.parametrize("kernel", ["fp32_linear", "fp32_linear_avx2", None])
@pytest.mark.parametrize("rows", [6, 12])
def test_few_row_products_equal_transformers(tiny, kernel, rows, monkeypatch):
    """2-16 rows per product on a CPU run our fp32 kernel (2-8 rows: AVX-512, or AVX2
    without it) or read oneDNN-packed copies of the weights."""
    from gpt2 import cpu_kernels

    if kernel is not None:
        cpus = {"fp32_linear": "_is_avx512_supported", "fp32_linear_avx2": "_is_avx2_supported"}
        if cpu_kernels.fp32_op() is None or not getattr(torch.cpu, cpus[kernel])():
            pytest.skip("no such kernel here")
        monkeypatch.setattr(cpu_kernels, "fp32_op", lambda: getattr(torch.ops.gpt2, kernel))
    else:
        monkeypatch.setattr(cpu_kernels, "fp32_op", lambda: None)
    model, hf = tiny
    gpt2.products._CPU_PACKED.clear()
    idx = random_ids(128, (rows, 1), seed=3)  # rows of one token: the batched decode shape
    assert model.h[0].attn.c_attn.weight.dtype == torch.float32
    with torch.no_grad():
        ours = model(idx)
    assert (ours - hf_logits(hf, idx)).abs().max().item() <= LOGITS_ATOL
    if torch.backends.mkldnn.is_available():  # which path ran
        ours_ran = kernel is not None and rows <= cpu_kernels.FP32_MAX_ROWS
        assert (id(model.h[0].attn.c_attn.weight) in gpt2.products._CPU_PACKED) != ours_ran


@pytest.mark.parametrize("shape", [(1, 12), (2, 5)])
def test_a_short_prompt_makes_no_packed_copies(tiny, shape, monkeypatch):
    """The oneDNN copies serve batches decoding one token a row. A prompt of 9-16 tokens
    made one of every weight, kept while the model lived (+335 MB for 124M, for a
    one-off pass that decoding never repeats)."""
    from gpt2 import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "fp32_op", lambda: None)  # (rows 2-8 would be ours)
    model, hf = tiny
    gpt2.products._CPU_PACKED.clear()
    idx = random_ids(128, shape, seed=4)
    with torch.no_grad():
        ours = model(idx)
    assert (ours - hf_logits(hf, idx)).abs().max().item() <= LOGITS_ATOL
    assert not gpt2.products._CPU_PACKED


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", ".data scaled",
                                    ".data replaced"])
def test_packed_copies_follow_in_place_weight_changes(hf_checkpoint, change, monkeypatch):
    """PyTorch counts the first two in a weight's _version; writes through .data it does
    not count, and the copies went stale (a batch of 9-16 prompts decoded with the old
    weights after the first token)."""
    from gpt2 import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "fp32_op", lambda: None)  # oneDNN's path
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=1)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    idx = random_ids(128, (4, 1), seed=5)
    with torch.no_grad():
        model(idx)  # makes the packed copies
    if torch.backends.mkldnn.is_available():
        assert id(model.h[0].mlp.c_fc.weight) in gpt2.products._CPU_PACKED
    if change == "optimizer step":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        F.cross_entropy(model(random_ids(128, (2, 8))).flatten(0, 1),
                        random_ids(128, (16,), seed=2)).backward()  # fmt: skip
        opt.step()
    elif change == "load_state_dict":
        other = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=2)
        model.load_state_dict(GPT2.from_pretrained(other.folder).state_dict())
    else:
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("h."):
                if change == ".data scaled":
                    p.data.mul_(-3.0)
                else:
                    p.data = p.data * 0.5
    # the oracle: transformers holding the changed weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(ckpt.model.config).eval()
    state = {f"transformer.{k}": (v.t() if v.dim() == 2 and ".h." in f".{k}" and "weight" in k
                                  else v) for k, v in model.state_dict().items()}  # fmt: skip
    missing, _ = hf.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    with torch.no_grad():
        ours = model(idx)
    assert (ours - hf_logits(hf, idx)).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_whole_model_pickles_after_fast_paths_ran(tiny, precision):
    """torch.save(model) must not meet the kernels' private copies (oneDNN's opaque
    tensors cannot be pickled): they are left out and rebuilt on load."""
    from gpt2.quantize import cpu_supports_bf16, prepare_bf16, quantize_model

    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    model, hf = tiny
    model = GPT2.from_pretrained(model.source.path)
    if precision == "bf16":
        model = prepare_bf16(model)
    elif precision == "int8":
        model = quantize_model(model, "int8")
    idx = random_ids(128, (4, 1), seed=7)
    with torch.no_grad():
        before = model(idx)  # batched rows: every packed copy exists now
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(idx), before)
