"""The fixed-shape decode step (gpt2.fast_decode) against independent oracles.

On CPU the step runs eagerly (`StaticDecoder`), which checks its logic: the
logits of every step against the model's normal cached path and against
transformers' `GPT2LMHeadModel` on the same random weights, greedy tokens
against transformers' full recomputation, and the GPU sampler's distribution
against probabilities worked out by hand. The CUDA-graph tests need a GPU and
skip without one.
"""

from __future__ import annotations

import pytest
import torch

import gpt2.fast_decode
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.fast_decode import (
    CudaGraphDecoder,
    StaticDecoder,
    block_step,
    block_step_one_row,
    decode_step,
    pick_next,
)
from gpt2.model import GPT2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEP_ATOL = 1e-5  # fp32, same weights: only summation order differs


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    """(our model, transformers' model) holding the same random weights; n_ctx 32."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=7)
    return GPT2.from_pretrained(ckpt.folder), ckpt.model


def random_ids(shape: tuple[int, ...], seed: int, n_vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, n_vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by recomputing the whole sequence each step: no cache at all."""
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(idx).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


# --------------------------------------------------------------------------- the step


@torch.no_grad()
def test_step_logits_match_cached_path_and_transformers(tiny):
    model, hf = tiny
    B, T, L = 2, 5, 32
    seq = random_ids((B, L), seed=1)  # teacher-forced: every step feeds seq's next token
    static = model.new_cache(B, L)
    normal = model.new_cache(B, L)
    model(seq[:, :T], cache=static)  # the prefill is the normal forward in both
    model(seq[:, :T], cache=normal)
    hf_all = hf(seq).logits  # (B, L, V): the oracle, no cache
    for t in range(T, L):
        pos = torch.tensor([t])
        ours = decode_step(model, static.k, static.v, seq[:, t], pos)  # (B, V)
        cached = model(seq[:, t:t + 1], cache=normal)[:, -1]  # (B, V)
        assert (ours - cached).abs().max().item() <= STEP_ATOL, f"step at position {t}"
        assert (ours - hf_all[:, t]).abs().max().item() <= STEP_ATOL, f"position {t} vs HF"


@torch.no_grad()
@pytest.mark.parametrize("step, rows, attention", [(block_step, 2, "sdpa"),
                                                   (block_step_one_row, 1, "reduce"),
                                                   (block_step, 2, "fused"),
                                                   (block_step_one_row, 1, "fused")])
def test_compiled_block_step_is_one_graph_for_every_layer(hf_checkpoint, step, rows,
                                                          attention, monkeypatch, request):
    """torch.compile must trace each block step whole (fullgraph) and reuse it across
    layers; "aot_eager" runs dynamo and AOT autograd's functionalisation (which
    must handle the in-place cache writes, the fused kernel's too) without the
    minute-long C++ build. As in a new process, no CPU kernel has been picked yet:
    the checks that pick one (torch.cpu's feature tests) cannot be traced, so
    compiled code must not reach them."""
    from gpt2 import cpu_kernels

    use_attention(attention, monkeypatch, request)
    ckpt = hf_checkpoint(n_layer=3, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=2)
    model = GPT2.from_pretrained(ckpt.folder)
    idx = random_ids((rows, 6), seed=3)
    caches = [model.new_cache(rows, 16) for _ in range(2)]
    for cache in caches:
        model(idx, cache=cache)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    token, pos = idx[:, -1], torch.tensor([6])
    want = decode_step(model, caches[0].k, caches[0].v, token, pos)
    monkeypatch.setattr(cpu_kernels, "_gelu", {})  # none picked yet, as in a new process
    got = decode_step(model, caches[1].k, caches[1].v, token, pos, block_fn=compiled)
    assert torch.allclose(got, want, atol=STEP_ATOL, rtol=0)  # eager: oneDNN; compiled: MKL
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=STEP_ATOL, rtol=0)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=STEP_ATOL, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # not one per layer


def use_attention(attention: str, monkeypatch, request) -> None:
    """Make block_step_one_row attend with `attention`, and block_step too where it
    is "fused" (the Triton kernel, run where the triton_device fixture says: on a
    CPU, Triton's interpreter, which block_step leaves to the tests)."""
    fd = gpt2.fast_decode
    if attention == "fused":
        request.getfixturevalue("triton_device")
        monkeypatch.setattr(fd, "_batched_attention", lambda x: fd._fused)
    monkeypatch.setattr(fd, "ONE_ROW_ATTENTION", attention)
    monkeypatch.setattr(fd, "BATCHED_ATTENTION", "fused" if attention == "fused" else "sdpa")


def count_kernel_calls(monkeypatch) -> list:
    """Count the calls of the fused attention kernel (one per layer and step)."""
    calls = []
    real = gpt2.gpu_kernels.decode_attention
    monkeypatch.setattr(gpt2.gpu_kernels, "decode_attention",
                        lambda *a: calls.append(1) or real(*a))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("attention", ["reduce", "sdpa", "fused"])
@pytest.mark.parametrize("full_cache", [False, True])
def test_one_row_step_matches_transformers(tiny, full_cache, attention, monkeypatch,
                                           request):
    """The reduction form of the step (what a compiled one-row GPU decoder runs)
    gives transformers' logits at every position, over a masked full-length cache
    and over a cache that ends at the new slot, with each attention."""
    use_attention(attention, monkeypatch, request)
    model, hf = tiny
    T, L = 3, 32
    seq = random_ids((1, L), seed=11)
    cache = model.new_cache(1, L)
    model(seq[:, :T], cache=cache)
    hf_all = hf(seq).logits  # (1, L, V)
    for t in range(T, L):
        pos = torch.tensor([t])
        k, v = (cache.k, cache.v) if full_cache else (cache.k[:, :, :, : t + 1],
                                                      cache.v[:, :, :, : t + 1])
        ours = decode_step(model, k, v, seq[:, t], pos, block_fn=block_step_one_row,
                           attend_all=not full_cache)  # (1, V)
        assert (ours - hf_all[:, t]).abs().max().item() <= STEP_ATOL, f"position {t}"


def test_pick_next_compiles_without_graph_breaks():
    torch._dynamo.reset()
    compiled = torch.compile(pick_next, backend="aot_eager", fullgraph=True, dynamic=False)
    # wider than the 64 tokens apply_top_p's adaptive path looks at first: that path
    # reads a flag back to the host, which a CUDA graph cannot hold
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    noise = torch.empty(3, 200).exponential_(generator=torch.Generator().manual_seed(1))
    for kw in (dict(temperature=0.0, top_k=None, top_p=None),
               dict(temperature=0.7, top_k=10, top_p=0.9)):
        assert torch.equal(compiled(logits, noise, **kw), pick_next(logits, noise, **kw))


# --------------------------------------------------------------------------- decoding


def test_greedy_matches_normal_path_and_transformers(tiny):
    model, hf = tiny
    idx = random_ids((3, 4), seed=5)
    n = 28  # up to the full context of 32: the last slot of the cache is used too
    ours = StaticDecoder(model, batch_size=3, max_len=32).generate(
        idx, max_new_tokens=n, temperature=0.0)
    assert torch.equal(ours, hf_greedy(hf, idx, n))
    assert torch.equal(ours, model.generate(idx, max_new_tokens=n, temperature=0.0))


def test_fused_attention_greedy_matches_transformers(tiny, monkeypatch, request):
    """Several rows through block_step with the Triton kernel's cache writes and
    attention, up to the last slot of the cache."""
    use_attention("fused", monkeypatch, request)
    calls = count_kernel_calls(monkeypatch)
    model, hf = tiny
    idx = random_ids((3, 4), seed=5)
    ours = StaticDecoder(model, batch_size=3, max_len=32).generate(
        idx, max_new_tokens=28, temperature=0.0)
    assert torch.equal(ours, hf_greedy(hf, idx, 28))
    assert len(calls) >= 27 * model.config.n_layer  # the kernel ran at each step


def test_batched_step_on_a_cpu_uses_sdpa_not_the_triton_kernel(tiny, monkeypatch):
    """The default BATCHED_ATTENTION, "fused", is a GPU kernel: a CPU decodes with SDPA
    (Triton's interpreter would run the kernel there, slowly), with the same tokens."""
    assert gpt2.fast_decode.BATCHED_ATTENTION == "fused"
    calls = count_kernel_calls(monkeypatch)
    model, hf = tiny
    idx = random_ids((3, 4), seed=5)
    ours = StaticDecoder(model, batch_size=3, max_len=16).generate(
        idx, max_new_tokens=12, temperature=0.0)
    assert torch.equal(ours, hf_greedy(hf, idx, 12))
    assert calls == []


def test_reuse_with_another_prompt_length(tiny):
    """The second call must forget the first call's cache and positions."""
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=2, max_len=24)
    first = random_ids((2, 9), seed=8)
    second = random_ids((2, 3), seed=9)
    decoder.generate(first, max_new_tokens=15, temperature=0.0)
    again = decoder.generate(second, max_new_tokens=12, temperature=0.0)
    assert torch.equal(again, model.generate(second, max_new_tokens=12, temperature=0.0))


def test_stream_yields_what_generate_returns(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=2, max_len=16)
    idx = random_ids((2, 4), seed=11)
    full = decoder.generate(idx, max_new_tokens=8, temperature=0.9, top_k=20, seed=4)
    steps = list(decoder.stream(idx, max_new_tokens=8, temperature=0.9, top_k=20, seed=4))
    assert torch.equal(torch.stack(steps, dim=1), full[:, 4:])


def test_sampling_is_seeded(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=2, max_len=32)
    idx = random_ids((2, 4), seed=12)
    kw = dict(max_new_tokens=20, temperature=1.5, top_p=0.95)
    a = decoder.generate(idx, seed=1, **kw)
    assert torch.equal(a, decoder.generate(idx, seed=1, **kw))
    assert not torch.equal(a, decoder.generate(idx, seed=2, **kw))
    # top_k=1 leaves one token of probability 1: sampling must give the greedy tokens
    greedy = decoder.generate(idx, max_new_tokens=20, temperature=0.0)
    assert torch.equal(decoder.generate(idx, max_new_tokens=20, top_k=1, seed=3), greedy)


def test_other_dtype_runs_in_a_copy(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=1, max_len=16, dtype=torch.float64)
    assert decoder.model.wte.weight.dtype == torch.float64
    assert model.wte.weight.dtype == torch.float32  # the caller's model is untouched
    idx = random_ids((1, 4), seed=13)
    want = model.generate(idx, max_new_tokens=10, temperature=0.0)
    assert torch.equal(decoder.generate(idx, max_new_tokens=10, temperature=0.0), want)


# --------------------------------------------------------------------------- the sampler


def sample_frequencies(logits: torch.Tensor, n: int, **options) -> torch.Tensor:
    """Frequencies of pick_next's tokens over n independent rows of the same logits."""
    rows = logits.expand(n, -1)  # (n, V)
    noise = torch.empty(rows.shape).exponential_(generator=torch.Generator().manual_seed(0))
    tokens = pick_next(rows, noise, **options)  # (n,)
    return torch.bincount(tokens, minlength=logits.size(-1)).double() / n


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # plain sampling: the probabilities themselves
        (dict(temperature=1.0, top_k=None, top_p=None), [0.5, 0.3, 0.15, 0.05]),
        # top-p 0.8: 0.5 + 0.3 reaches it, renormalised to 5/8 and 3/8
        (dict(temperature=1.0, top_k=None, top_p=0.8), [0.625, 0.375, 0.0, 0.0]),
        # temperature 0.5 squares the probabilities; top-k 3 drops the last
        (dict(temperature=0.5, top_k=3, top_p=None),
         [0.25 / 0.3625, 0.09 / 0.3625, 0.0225 / 0.3625, 0.0]),
    ],
)
def test_sampler_distribution(options, expected):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    freq = sample_frequencies(logits, 40_000, **options)
    # 40,000 draws: the standard error is at most 0.0025, so 0.015 is 6 sigma
    assert freq.tolist() == pytest.approx(expected, abs=0.015)


def test_sampler_never_picks_a_filtered_token_even_with_zero_noise():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    noise = torch.zeros(1, 5)  # Exp(1) can return exactly 0; 0/0 would be NaN, which argmax picks
    token = pick_next(logits, noise, temperature=1.0, top_k=2, top_p=None)
    assert token.item() in (0, 1)
    assert pick_next(logits, noise, temperature=0.0, top_k=None, top_p=None).item() == 0


def test_greedy_ignores_noise():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    noise = torch.rand(4, 30)
    got = pick_next(logits, noise, temperature=0.0, top_k=None, top_p=None)
    assert torch.equal(got, logits.argmax(-1))


# --------------------------------------------------------------------------- errors


def test_errors_are_one_line_gpt2errors(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=2, max_len=10)
    bad = [
        lambda: decoder.generate(random_ids((3, 4), 0), max_new_tokens=2),  # wrong batch
        lambda: decoder.generate(random_ids((2, 4), 0), max_new_tokens=7),  # past max_len
        lambda: decoder.generate(random_ids((2, 4), 0), max_new_tokens=0),
        lambda: decoder.generate(random_ids((2, 4), 0), max_new_tokens=2, temperature=-1.0),
        lambda: decoder.generate(random_ids((2, 4), 0), max_new_tokens=2, top_p=1.5),
        lambda: StaticDecoder(model, batch_size=1, max_len=33),  # beyond n_ctx
        lambda: StaticDecoder(model, batch_size=0, max_len=8),
    ]
    for call in bad:
        with pytest.raises(GPT2Error) as err:
            call()
        assert "\n" not in str(err.value)


def test_stream_checks_its_arguments_before_the_first_token(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, batch_size=1, max_len=8)
    with pytest.raises(GPT2Error):
        decoder.stream(random_ids((1, 4), 0), max_new_tokens=5)  # no next() needed


def test_cuda_graph_decoder_refuses_a_cpu_model(tiny):
    model, _ = tiny
    with pytest.raises(GPT2Error, match="CUDA"):
        CudaGraphDecoder(model, batch_size=1, max_len=16)


# --------------------------------------------------------------------------- CUDA graphs


@pytest.fixture(scope="module")
def tiny_cuda(tiny):
    """The tiny model's weights on the GPU (a copy: the CPU model stays where it is)."""
    model, _ = tiny
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    copy = GPT2(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.to("cuda").eval()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_greedy_matches_eager_fp32(tiny, tiny_cuda, compile):
    model, hf = tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    idx = random_ids((2, 4), seed=21)
    graph = CudaGraphDecoder(tiny_cuda, batch_size=2, max_len=32, dtype=torch.float32,
                             compile=compile)
    got = graph.generate(idx, max_new_tokens=28, temperature=0.0).cpu()
    assert torch.equal(got, hf_greedy(hf, idx, 28))
    # again, with another prompt length, through the already captured graph
    idx = random_ids((2, 7), seed=22)
    got = graph.generate(idx, max_new_tokens=20, temperature=0.0).cpu()
    assert torch.equal(got, hf_greedy(hf, idx, 20))


@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_one_row_greedy_matches_transformers_fp32(tiny, tiny_cuda):
    """Batch 1, compiled: the decoder runs block_step_one_row (Triton reductions)."""
    model, hf = tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    graph = CudaGraphDecoder(tiny_cuda, batch_size=1, max_len=32, dtype=torch.float32)
    assert graph.block_fn._torchdynamo_orig_callable is block_step_one_row
    for seed, T in ((24, 4), (25, 9)):
        idx = random_ids((1, T), seed=seed)
        got = graph.generate(idx, max_new_tokens=32 - T, temperature=0.0).cpu()
        assert torch.equal(got, hf_greedy(hf, idx, 32 - T))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_fused_attention_greedy_matches_transformers_fp32(
        tiny, tiny_cuda, batch, monkeypatch, request):
    """Compiled and captured, with the Triton kernel for the cache writes and attention
    (what bench/gpu_profile.py's "_fused" variants measure)."""
    use_attention("fused", monkeypatch, request)
    model, hf = tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    graph = CudaGraphDecoder(tiny_cuda, batch_size=batch, max_len=32, dtype=torch.float32)
    idx = random_ids((batch, 5), seed=26)
    got = graph.generate(idx, max_new_tokens=27, temperature=0.0).cpu()
    assert torch.equal(got, hf_greedy(hf, idx, 27))


@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_sampling_equals_eager_static_step(tiny_cuda):
    """Without compile the graph replays exactly the eager step's kernels: same seed,
    same tokens, in bf16 too."""
    idx = random_ids((4, 3), seed=23).cuda()
    kw = dict(max_new_tokens=25, temperature=0.8, top_k=40, top_p=0.9, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        eager = StaticDecoder(tiny_cuda, batch_size=4, max_len=28, dtype=dtype)
        graph = CudaGraphDecoder(tiny_cuda, batch_size=4, max_len=28, dtype=dtype,
                                 compile=False)
        assert torch.equal(graph.generate(idx, **kw), eager.generate(idx, **kw))
        greedy = dict(max_new_tokens=25, temperature=0.0)
        assert torch.equal(graph.generate(idx, **greedy), eager.generate(idx, **greedy))


def test_quantized_model_is_not_cast_to_another_dtype():
    from gpt2.quantize import quantize_model

    model = quantize_model(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96,
                                           n_ctx=16)).eval(), "int8")  # fmt: skip
    with pytest.raises(GPT2Error, match="quantized") as e:
        StaticDecoder(model, batch_size=1, max_len=8, dtype=torch.bfloat16)
    assert "\n" not in str(e.value)
    # in its own precision it decodes like the normal path
    idx = torch.tensor([[1, 2, 3]])
    got = StaticDecoder(model, batch_size=1, max_len=8).generate(idx, max_new_tokens=4,
                                                                 temperature=0.0)  # fmt: skip
    assert torch.equal(got, model.generate(idx, max_new_tokens=4, temperature=0.0))
