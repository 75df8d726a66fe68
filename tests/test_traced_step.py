"""The CPU decode step replayed by TorchScript (gpt2.traced_step).

Its logits are checked against transformers' `GPT2LMHeadModel` on the same
random weights, and `generate` with it against `generate` without it (which
the other test files check against transformers); then the cases where a
recording must not be used: a changed model, hooks, padding, a failed trace.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import gpt2.traced_step as traced_step
from gpt2 import cpu_kernels
from gpt2.generate import generate_batch
from gpt2.model import GPT2
from gpt2.quantize import cpu_supports_bf16, prepare_bf16, quantize_model


@pytest.fixture(autouse=True)
def record_at_once(monkeypatch):
    """These tests decode a few steps at a time: record at the first one."""
    monkeypatch.setattr(traced_step, "RECORD_AFTER_STEPS", 0)


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    """(our model, transformers' model) holding the same random weights; n_ctx 64."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=64, seed=11)
    return GPT2.from_pretrained(ckpt.folder).eval(), ckpt.model


def ids(shape, seed):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def plain_generate(model, idx, **kwargs):
    traced_step.TRACE_CPU_STEP = False
    try:
        return model.generate(idx, **kwargs)
    finally:
        traced_step.TRACE_CPU_STEP = True


def recording(model, batch):
    return traced_step._RECORDINGS.get(model, {}).get(batch, (None, None))[1]


@pytest.mark.parametrize("batch", [1, 3])
@torch.inference_mode()
def test_replayed_step_logits_match_transformers(pair, batch):
    model, hf = pair
    prompt = ids((batch, 5), seed=batch)
    cache = model.new_cache(batch, max_len=20)
    model(prompt, cache=cache)
    step = traced_step.cpu_step(model, cache)
    seq = prompt
    for i in range(8):  # the recording is made at the first step and replayed after it
        token = ids((batch,), seed=100 + i)
        ours = step(token)  # (B, V)
        seq = torch.cat([seq, token[:, None]], dim=1)
        theirs = hf(seq).logits[:, -1]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert cache.length == 5 + 8
    if batch == 1 or cpu_kernels.fp32_op() is not None:  # else fp32 with several rows
        assert recording(model, batch) is not None  # uses oneDNN's packed weights, which
        # TorchScript cannot hold: plain step there


@pytest.mark.parametrize("quantize", [None, "int8", "int8-weight-only", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_same_tokens_with_and_without_the_recording(pair, hf_checkpoint, quantize,
                                                             batch):  # fmt: skip
    model = pair[0]
    if quantize == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    if quantize:
        ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=64, seed=11)
        model = GPT2.from_pretrained(ckpt.folder).eval()
        model = prepare_bf16(model) if quantize == "bf16" else quantize_model(model, quantize)
    prompt = ids((batch, 4), seed=7)
    for new in (6, 20):  # one recording serves both lengths (and every cache length)
        expected = plain_generate(model, prompt, max_new_tokens=new, temperature=0.0)
        assert torch.equal(model.generate(prompt, max_new_tokens=new, temperature=0.0), expected)
    sampled = dict(max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
    assert torch.equal(model.generate(prompt, **sampled), plain_generate(model, prompt, **sampled))
    ours_fp32 = quantize is None and cpu_kernels.fp32_op() is not None
    if quantize == "int8" or batch == 1 or ours_fp32:
        # FBGEMM's packed weights trace at any batch size, our fp32 kernel too; oneDNN's
        # packed fp32 weights (2-16 rows where ours does not run) do not
        assert recording(model, batch) is not None


def test_a_weight_changed_in_place_makes_a_new_recording(hf_checkpoint):
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=64, seed=12)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    prompt = ids((1, 4), seed=1)
    model.generate(prompt, max_new_tokens=5, temperature=0.0)
    first = recording(model, 1)
    assert first is not None
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(3.0)  # changes the continuation
    expected = plain_generate(model, prompt, max_new_tokens=10, temperature=0.0)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, temperature=0.0), expected)
    assert recording(model, 1) is not first


def test_not_used_with_hooks_or_padding(pair):
    model = pair[0]
    cache = model.new_cache(1, max_len=8)
    seen = []
    with model.hooks({"blocks.0.mlp.out": lambda z: seen.append(z.shape)}):
        assert traced_step.cpu_step(model, cache) is None
        model.generate(ids((1, 3), seed=2), max_new_tokens=4, temperature=0.0)
    assert len(seen) == 4  # the prompt, then every new token but the last: hooks ran
    prompts = [[1, 2, 3, 4], [5]]  # left-padded: the normal forward with its mask
    padded = generate_batch(model, prompts, max_new_tokens=5, temperature=0.0)
    alone = [generate_batch(model, [p], max_new_tokens=5, temperature=0.0)[0] for p in prompts]
    assert padded == alone


@pytest.mark.parametrize("where", ["module", "pre", "global"])
def test_not_used_with_pytorchs_own_hooks(pair, monkeypatch, where):
    """A hook of PyTorch's own (register_forward_hook, ...) runs at every step, also once
    the model has been recorded: the recording would skip it (it did, and generate's
    tokens then depended on earlier calls)."""
    from torch.nn.modules.module import register_module_forward_hook

    model = pair[0]
    monkeypatch.setattr(traced_step, "RECORD_AFTER_STEPS", 0)  # recorded at once
    idx = ids((1, 3), seed=2)
    model.generate(idx, max_new_tokens=4, temperature=0.0)
    assert recording(model, 1) is not None
    mlp, calls = model.h[0].mlp, []
    if where == "module":
        handle = mlp.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0)
    elif where == "pre":
        handle = mlp.register_forward_pre_hook(lambda m, i: calls.append(1))
    else:
        handle = register_module_forward_hook(
            lambda m, i, o: calls.append(1) if m is mlp else None)
    try:
        assert traced_step.cpu_step(model, model.new_cache(1, max_len=8)) is None
        hooked = model.generate(idx, max_new_tokens=6, temperature=0.0)
        assert len(calls) == 6  # the prompt, then every new token but the last
        if where == "module":  # block 0's MLP zeroed at every step: the plain forward's
            assert torch.equal(hooked, plain_generate(model, idx, max_new_tokens=6,
                                                      temperature=0.0))
    finally:
        handle.remove()


def test_a_failed_trace_falls_back_to_the_plain_step(hf_checkpoint, monkeypatch):
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=64, seed=13)
    model = GPT2.from_pretrained(ckpt.folder).eval()

    def broken(*args, **kwargs):
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(torch.jit, "_get_trace_graph", broken)
    prompt = ids((1, 4), seed=3)
    expected = plain_generate(model, prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0.0), expected)
    assert traced_step._RECORDINGS[model][1] is not None  # tried once ...
    assert recording(model, 1) is None  # ... and failed: not tried again


def test_a_recording_does_not_keep_its_model_alive(hf_checkpoint):
    ckpt = hf_checkpoint(n_layer=1, n_embd=32, n_head=2, n_vocab=128, n_ctx=16, seed=14)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    model.generate(ids((1, 3), seed=4), max_new_tokens=3, temperature=0.0)
    assert recording(model, 1) is not None
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_a_recording_does_not_keep_its_models_weights_alive(hf_checkpoint):
    """The memory of a model that recorded a step goes with the model. A traced graph
    lives in PyTorch's global compilation unit for the whole process, so a weight held
    there as a constant would never be freed (+490 MB per fp32 124M model before).
    Each weight here is a numpy array's memory: the array lives while anything holds it."""

    ckpt = hf_checkpoint(n_layer=1, n_embd=32, n_head=2, n_vocab=128, n_ctx=16, seed=14)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    arrays = []
    with torch.no_grad():
        for module, name in ((model.wte, "weight"), (model.h[0].mlp.c_fc, "weight"),
                             (model.h[0].attn.c_attn, "bias")):
            array = getattr(module, name).detach().numpy().copy()
            setattr(module, name, torch.nn.Parameter(torch.from_numpy(array)))
            arrays.append(weakref.ref(array))
            del array, module
    model.generate(ids((1, 3), seed=4), max_new_tokens=4, temperature=0.0)
    assert recording(model, 1) is not None
    assert all(a() is not None for a in arrays)
    del model
    gc.collect()
    assert [a() is None for a in arrays] == [True, True, True]


def test_recorded_once_the_model_has_decoded_enough_steps(hf_checkpoint, monkeypatch):
    monkeypatch.setattr(traced_step, "RECORD_AFTER_STEPS", 30)
    ckpt = hf_checkpoint(n_layer=1, n_embd=32, n_head=2, n_vocab=128, n_ctx=64, seed=15)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    prompt = ids((1, 3), seed=5)
    model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert 1 not in traced_step._RECORDINGS.get(model, {})  # 20 steps planned: plain loop
    model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert recording(model, 1) is not None  # 40 >= 30: recorded
    assert 2 not in traced_step._RECORDINGS[model]  # counted per batch size
    other = GPT2.from_pretrained(ckpt.folder).eval()
    other.generate(prompt, max_new_tokens=40, temperature=0.0)  # one long call: at once
    assert recording(other, 1) is not None


def test_a_changed_model_counts_its_steps_afresh(hf_checkpoint, monkeypatch):
    """A trainer's samples between optimizer steps: each sees new weights, and a
    short one must not pay for a recording."""
    monkeypatch.setattr(traced_step, "RECORD_AFTER_STEPS", 30)
    ckpt = hf_checkpoint(n_layer=1, n_embd=32, n_head=2, n_vocab=128, n_ctx=64, seed=16)
    model = GPT2.from_pretrained(ckpt.folder).eval()
    prompt = ids((1, 3), seed=6)
    model.generate(prompt, max_new_tokens=40, temperature=0.0)
    assert recording(model, 1) is not None
    with torch.no_grad():
        model.ln_f.weight.mul_(1.5)
    model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert 1 not in traced_step._RECORDINGS[model]  # 20 steps on these weights: plain loop
    model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert recording(model, 1) is not None  # 40 on these weights: recorded


def test_not_used_under_autocast(pair):
    model = pair[0]
    cache = model.new_cache(1, max_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert traced_step.cpu_step(model, cache, planned_steps=1000) is None
    assert traced_step.cpu_step(model, cache, planned_steps=1000) is not None
