"""Where the GPU time goes: kernel tables of a decode step and a training step.

    python bench/gpu_profile.py                  # on a CUDA machine; JSON + tables to $OUT

bench/gpu.py says how fast; this says why. For 124M it prints torch.profiler's
kernels, heaviest first, of:

    decode   one token of the CUDA-graph decoder at batch 1 (--decode-batch: another
             batch; bf16), uncompiled and with the per-layer step compiled,
             profiled as eager steps (the same kernels the graph replays) and as
             graph replays; the uncompiled graph's greedy tokens are checked
             against the same step run eagerly; then variants: the whole step compiled as one
             function instead of one layer; max-autotune (Triton matmuls); an
             additive float attention mask made once per step; SDPA limited to
             its memory-efficient kernel; block_step_one_row (products and
             attention as Triton reductions, or with SDPA's attention), with and
             without inductor's coordinate-descent tuning ("_tuned": the
             library's default is block_step_one_row with reductions, tuned);
             "_fused": the cache writes and attention as one Triton kernel
             (gpt2.gpu_kernels.decode_attention) in the one-row step, in the
             compiled block_step, or in the uncompiled graph
             (--decode-variants picks, in order)
    train    one optimizer step at 16 x 1024 (bf16 autocast, fused AdamW): eager, and
             compiled with the loss inside the compiled function (as the trainer
             does) or outside it; with the LM head padded to 50,304 rows (the
             default on a GPU) and not; the loss over all 50,304 padded logits with
             the pad held at -inf (the trainer's, gpt2.model.full_width_head) and
             over the 50,257 sliced from them (compiled_sliced_loss, the trainer's
             before); SDPA without cuDNN's kernel (its flash kernel instead);
             max-autotune; CUDA graphs of the forward and backward
             (mode="reduce-overhead"), alone and with SDPA's flash kernel
    trainer  the training loop itself (`gpt2 train --compile`, 30 steps): tokens/s,
             the Python time to queue a step, the synchronising CUDA calls and the
             kernels of a few steps; variants without gradient clipping, with a
             deeper pipeline, without host-to-device batches, with one AdamW
             parameter group, with the clipping and optimizer step compiled, with
             the compiled F.cross_entropy instead of gpt2.gpu_kernels.cross_entropy
             (compiled_loss), with clip_grad_norm_ before the optimizer instead of the
             clipping as the fused AdamW's grad_scale (clip_grad_norm,
             CLIP_IN_FUSED_ADAMW off) (--trainer-variants)
    loss     the training loss alone at 16 x 1024 (bf16 logits, 50,304 wide, the pad at
             -inf), forward and backward timed apart: the compiled F.cross_entropy
             against gpt2.gpu_kernels.cross_entropy at each block and warps of
             --loss-settings, the loss and gradient compared with the compiled one's

Each variant's time is the median of --runs after warm-up; greedy tokens are
compared with the first variant's. Findings so far: bench/GPU_NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).parent))
import gpt2.fast_decode  # noqa: E402
import gpt2.model  # noqa: E402
from gpt2._io import atomic_write_text  # noqa: E402
from gpt2.config import GPT2Config  # noqa: E402
from gpt2.fast_decode import (  # noqa: E402
    CudaGraphDecoder,
    StaticDecoder,
    decode_step,
    pick_next,
)
from gpt2.train.flops import peak_flops, training_flops_per_token  # noqa: E402
from gpt2.train.trainer import ModelLoss, lm_loss  # noqa: E402
from gpu import Clock, first_mismatch, free, ours, run_trainer  # noqa: E402 (bench/gpu.py)


def kernel_table(prof, steps: int, limit: int = 18) -> dict:
    """Kernels by total GPU time over `steps` steps -> printed table and a dict."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((e.key, e.count, t))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    launches = sum(r[1] for r in rows)
    print(f"  GPU kernel time per step {total / steps:9.1f} us, kernels per step "
          f"{launches / steps:6.1f}")
    for name, count, t in rows[:limit]:
        print(f"  {t / steps:9.1f} us {count / steps:6.1f}x  {name[:100]}")
    return {"us_per_step": total / steps, "kernels_per_step": launches / steps,
            "top": [{"name": n, "per_step": c / steps, "us_per_step": t / steps}
                    for n, c, t in rows[:limit]]}


def profile(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, steps)


def median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- decode


class WholeStepDecoder(CudaGraphDecoder):
    """The graph decoder with the whole greedy step (all layers, argmax, the token
    bookkeeping) compiled as one function, instead of one layer at a time."""

    def __init__(self, model, **kw) -> None:
        super().__init__(model, compile=False, dtype=None, **kw)

        def whole(model, k, v, token, pos, out):
            nxt = pick_next(decode_step(model, k, v, token, pos), None, temperature=0.0,
                            top_k=None, top_p=None)
            pos.add_(1)
            token.copy_(nxt)
            out.index_copy_(1, pos, nxt.unsqueeze(1))

        self._whole = torch.compile(whole, fullgraph=True, dynamic=False)

    def _step(self, options) -> None:
        assert options.greedy, "this variant is greedy only"
        self._whole(self.model, self.cache.k, self.cache.v, self.token, self.pos, self.out)


class FloatMaskDecoder(CudaGraphDecoder):
    """The per-layer compiled step with the attention mask made additive (0 / -inf in
    the model's dtype) once per step: the bool mask otherwise costs each layer a
    conversion kernel inside SDPA."""

    def _step(self, options) -> None:
        m, k, v, pos = self.model, self.cache.k, self.cache.v, self.pos
        L = k.size(3)
        hidden = (torch.arange(L, device=pos.device) > pos).view(1, 1, 1, L)
        mask = torch.zeros(1, 1, 1, L, dtype=k.dtype, device=pos.device)
        mask = mask.masked_fill(hidden, float("-inf"))  # (1, 1, 1, L)
        x = m.wte(self.token) + m.wpe(pos)  # (B, C)
        for i, block in enumerate(m.h):
            x = self.block_fn(block, x, k[i], v[i], pos, mask)
        logits = torch.nn.functional.linear(m.ln_f(x), m.wte.weight)  # (B, V)
        self._emit(self._pick(logits, options))


@contextlib.contextmanager
def sdpa_backends(*, cudnn: bool = True, flash: bool = True, efficient: bool = True):
    """Allow only some SDPA kernels while a variant compiles, captures and runs."""
    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled())
    b.enable_cudnn_sdp(cudnn), b.enable_flash_sdp(flash), b.enable_mem_efficient_sdp(efficient)
    try:
        yield
    finally:
        b.enable_cudnn_sdp(before[0]), b.enable_flash_sdp(before[1])
        b.enable_mem_efficient_sdp(before[2])


def section_decode(a, clock: Clock) -> dict:
    config = GPT2Config.preset("124M")
    model = ours(config, torch.device("cuda"), torch.bfloat16)
    prompt, new = 16, 128
    B = a.decode_batch
    idx = torch.randint(0, config.n_vocab, (B, prompt), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    out: dict = {}
    ref = None
    variants = [("graph", lambda: CudaGraphDecoder(model, batch_size=B, max_len=prompt + new,
                                                   dtype=None, compile=False)),
                ("graph_compiled_layer", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_compiled_whole", lambda: WholeStepDecoder(
                    model, batch_size=B, max_len=prompt + new)),
                ("graph_compiled_layer_autotune", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True,
                    compile_mode="max-autotune-no-cudagraphs")),
                ("graph_compiled_layer_float_mask", lambda: FloatMaskDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_compiled_layer_efficient_sdpa", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row_sdpa", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row_sdpa_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_compiled_layer_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row_realize_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_one_row_fused_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_compiled_layer_fused_tuned", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=True)),
                ("graph_fused", lambda: CudaGraphDecoder(
                    model, batch_size=B, max_len=prompt + new, dtype=None, compile=False))]
    for name, make in sorted(variants, key=lambda v: a.decode_variants.index(v[0])
                             if v[0] in a.decode_variants else len(variants)):
        if name not in a.decode_variants:
            continue
        # a new torch.compile of the same function would reuse the last variant's code
        torch._dynamo.reset()
        with contextlib.ExitStack() as stack:
            # block_step_one_row only where the variant's name says so
            # "_fused": the attention and cache writes as gpt2.gpu_kernels' Triton kernel
            fused = "_fused" in name
            stack.enter_context(one_row(name.startswith("graph_one_row"),
                                        "sdpa" if "_sdpa" in name else
                                        "fused" if fused else "reduce",
                                        "fused" if fused else "sdpa"))
            if name.endswith("efficient_sdpa"):
                stack.enter_context(sdpa_backends(cudnn=False, flash=False))
            if "_realize" in name:
                # Inductor inlines a pointwise result into the kernels that read it
                # unless it costs more than realize_opcount_threshold ops (30). GELU (~15)
                # is then recomputed by the down-projection's reduction for each of its
                # 768 outputs (a 5.2 us kernel, GPU_NOTES.md); at 8 it is stored once,
                # in the up-projection's epilogue.
                stack.enter_context(torch._inductor.config.patch(realize_opcount_threshold=8))
            # coordinate-descent tuning (the library's default) only for the tuned variants
            stack.enter_context(tuning(name.endswith("_tuned")))
            ref = decode_variant(a, clock, name, make, idx, new, out, ref)
        free(torch.device("cuda"))
    return out


@contextlib.contextmanager
def tuning(on: bool):
    """Set gpt2.fast_decode.TUNE_COMPILED_KERNELS while a variant is built and run."""
    fd = gpt2.fast_decode
    before = fd.TUNE_COMPILED_KERNELS
    fd.TUNE_COMPILED_KERNELS = on
    try:
        yield
    finally:
        fd.TUNE_COMPILED_KERNELS = before


@contextlib.contextmanager
def one_row(on: bool, attention: str, batched_attention: str):
    """Set gpt2.fast_decode.ONE_ROW_REDUCTIONS, ONE_ROW_ATTENTION and
    BATCHED_ATTENTION while a variant is built and run."""
    fd = gpt2.fast_decode
    before = fd.ONE_ROW_REDUCTIONS, fd.ONE_ROW_ATTENTION, fd.BATCHED_ATTENTION
    fd.ONE_ROW_REDUCTIONS, fd.ONE_ROW_ATTENTION, fd.BATCHED_ATTENTION = (
        on, attention, batched_attention)
    try:
        yield
    finally:
        fd.ONE_ROW_REDUCTIONS, fd.ONE_ROW_ATTENTION, fd.BATCHED_ATTENTION = before


def decode_variant(a, clock: Clock, name, make, idx, new: int, out: dict, ref):
    """Time, check and profile one decoder variant into out[name]; returns the greedy
    reference tokens (the first variant's)."""
    from gpt2.generate import SamplingOptions

    if clock.left() < 60:
        out[name] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
        return ref
    try:
        t0 = time.perf_counter()
        dec = make()
        tokens = dec.generate(idx, max_new_tokens=new, temperature=0.0)  # compiles, captures
        first = time.perf_counter() - t0
        s = median_s(lambda: dec.generate(idx, max_new_tokens=new, temperature=0.0), a.runs)
        B = idx.size(0)
        r = {"batch": B, "tokens_per_s": B * new / s, "first_call_s": first}
        ref = tokens if ref is None else ref
        r["greedy_identical_to_first_variant"] = first_mismatch(ref, tokens) is None
        print(f"\ndecode 124M b{B} {name}: {r['tokens_per_s']:,.0f} tokens/s "
              f"(first call {first:.1f} s), greedy tokens identical to the first variant's: "
              f"{r['greedy_identical_to_first_variant']}")
        if name == "graph":  # the graph replays the eager step's kernels: same tokens?
            eager = StaticDecoder(dec.model, batch_size=B, max_len=dec.max_len)
            once = eager.generate(idx, max_new_tokens=new, temperature=0.0)
            mismatch = first_mismatch(once, tokens)
            r["first_mismatch_vs_eager_static_step"] = mismatch
            print(f"  greedy tokens vs the same step run eagerly: first mismatch at {mismatch}")
            # is the eager step itself deterministic? (if not, the graph is not to blame)
            again = first_mismatch(once, eager.generate(idx, max_new_tokens=new,
                                                        temperature=0.0))
            r["first_mismatch_eager_static_run_twice"] = again
            print(f"  the eager step run twice: first mismatch at {again}")
        options = SamplingOptions(0.0, None, None)
        dec.generate(idx, max_new_tokens=2, temperature=0.0)  # leaves a prefilled cache
        graph = dec._runner(options)
        print("  as graph replays:")
        r["graph_replay"] = profile(graph, 32)
        if name in ("graph", "graph_compiled_layer", "graph_one_row"):
            print("  as eager steps (the same kernels, launched one by one):")
            r["eager_steps"] = profile(lambda: dec._step(options), 32)
        out[name] = r
    except Exception as e:
        traceback.print_exc()
        out[name] = {"error": f"{type(e).__name__}: {e}"}
    return ref


# --------------------------------------------------------------------------- train


def section_train(a, clock: Clock) -> dict:
    config = GPT2Config.preset("124M")
    B, T = 16, 1024
    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    x = torch.randint(0, config.n_vocab, (B, T + 1), device=device)  # inputs and targets
    peak = peak_flops(device)
    per_token = training_flops_per_token(config, 124_439_808, T)  # 124M, wpe included
    out: dict = {"batch": B, "seq": T, "peak_flops": peak, "flops_per_token": per_token}

    def run(name: str, *, pad: bool, compile: bool, prof: bool,
            loss_inside: bool = False, mode: str | None = None,
            full_width: bool | None = None, cudnn_sdpa: bool = True) -> None:
        if name not in a.train_variants:
            return
        if clock.left() < (70 if compile else 20):
            out[name] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
            return
        gpt2.model.PAD_HEAD_FOR_GPU_TRAINING = pad
        try:
            # without cuDNN's attention SDPA picks its flash kernel; set for this
            # variant's compiling, timing and profiling, reset below
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdpa)
            torch._dynamo.reset()  # a new compile must not reuse the last variant's code
            model = ours(config, device).train()
            if loss_inside:  # the model and its loss compiled as one, as the trainer does
                if name == "compiled_with_loss":  # the two losses agree (bf16 rounding)
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        diff = (ModelLoss(model, full_width=True)(x[:, :-1], x[:, 1:])
                                - ModelLoss(model, full_width=False)(x[:, :-1], x[:, 1:]))
                    print(f"  full-width loss - sliced loss: {diff.abs().item():.2e}")
                forward_loss = torch.compile(ModelLoss(model, full_width=full_width), mode=mode)
            else:
                net = torch.compile(model) if compile else model

                def forward_loss(inputs, targets):
                    return lm_loss(net(inputs), targets)

            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = forward_loss(x[:, :-1], x[:, 1:])  # as the trainer does
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            step()
            s = median_s(step, a.runs)
            tps = B * T / s
            r = {"tokens_per_s": tps, "ms_per_step": 1e3 * s, "first_call_s": first,
                 "mfu": per_token * tps / peak if peak else None}
            print(f"\ntrain 124M {B}x{T} {name}: {tps:,.0f} tokens/s, {1e3 * s:.1f} ms/step"
                  + (f", MFU {r['mfu']:.1%}" if peak else ""))
            if prof:
                r["profile"] = profile(step, 2)
            out[name] = r
        except Exception as e:
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            gpt2.model.PAD_HEAD_FOR_GPU_TRAINING = True
            torch.backends.cuda.enable_cudnn_sdp(True)
        free(device)

    run("compiled_with_loss", pad=True, compile=True, prof=True, loss_inside=True)
    run("compiled_model_only", pad=True, compile=True, prof=False)
    run("eager", pad=True, compile=False, prof=True)
    run("eager_plain_head", pad=False, compile=False, prof=True)
    run("compiled_with_loss_plain_head", pad=False, compile=True, prof=False,
        loss_inside=True)
    run("compiled_sliced_loss", pad=True, compile=True, prof=True, loss_inside=True,
        full_width=False)
    run("compiled_with_loss_flash_sdpa", pad=True, compile=True, prof=True, loss_inside=True,
        cudnn_sdpa=False)
    run("compiled_with_loss_autotune", pad=True, compile=True, prof=True, loss_inside=True,
        mode="max-autotune-no-cudagraphs")
    # the GPU idles ~1.6 ms of a 35.7 ms step between kernels: CUDA graphs of the
    # forward and backward (inductor's cudagraph trees) take the launches away
    run("compiled_with_loss_cudagraphs", pad=True, compile=True, prof=False, loss_inside=True,
        mode="reduce-overhead")
    run("compiled_with_loss_flash_cudagraphs", pad=True, compile=True, prof=True,
        loss_inside=True, cudnn_sdpa=False, mode="reduce-overhead")
    return out


# --------------------------------------------------------------------------- trainer


def section_trainer(a, clock: Clock) -> dict:
    """The training loop itself (gpt2.train.trainer, --compile, bf16, 124M, 16 x 1024,
    random tokens), 30 steps per variant. Each step's Python (the time _launch_step
    takes to queue it) is timed: a loop whose Python takes longer than the GPU's step
    leaves the GPU waiting. "default" also lists the synchronising CUDA calls made
    while steps 20-22 are queued (torch.cuda.set_sync_debug_mode) and the layout of
    the gradients the optimizer step gets; the variants in --trainer-profile have
    steps 16-18 profiled: their kernels and their wall time. Variants: without gradient clipping;
    reading each loss two steps later (PIPELINE_DEPTH 2); the batches made on the GPU
    once (no host-to-device copies); one AdamW parameter group instead of two; the
    gradient clipping and AdamW step compiled together (torch.compile's optimizer); the
    compiled F.cross_entropy as the loss; clip_grad_norm_ instead of the clipping as the
    fused AdamW's grad_scale."""
    import warnings

    import gpt2.train.trainer as trainer

    config = GPT2Config.preset("124M")
    B, T = 16, 1024
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a check
    if device.type == "cpu":
        config, B, T = GPT2Config(n_vocab=512, n_ctx=64, n_embd=64, n_head=4, n_layer=2), 2, 32
    cached: dict = {}

    def batch_on_device(run, tokens, seed, real=trainer._Run._batch):
        if seed not in cached:
            cached.clear()
            cached[seed] = real(run, tokens, seed)
        return cached[seed]

    def one_group(model, weight_decay):
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]

    def compiled_optimizer(model, *, lr, weight_decay, device):
        # torch.compile's optimizer: foreach AdamW, lr a tensor (a new lr would recompile
        # a float), capturable (the step counts on the GPU; needed with foreach there)
        cuda = device.type == "cuda"
        return torch.optim.AdamW(trainer.param_groups(model, weight_decay),
                                 lr=torch.tensor(lr, device=device), betas=(0.9, 0.95),
                                 eps=1e-8, foreach=cuda, capturable=cuda)

    def compiled_optimizer_step(run):
        step = run.__dict__.get("_compiled_step")
        if step is None:
            params = [p for p in run.model.parameters() if p.requires_grad]
            clip = run.cfg.grad_clip

            def clip_and_step():
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                run.optimizer.step()

            step = run._compiled_step = torch.compile(clip_and_step)
        step()

    variants = {  # name: (TrainConfig settings, (object, attribute, value) patches)
        "default": ({}, ()),
        "no_clip": ({"grad_clip": 0.0}, ()),
        "depth2": ({}, ((trainer, "PIPELINE_DEPTH", 2),)),
        "gpu_batches": ({}, ((trainer._Run, "_batch", batch_on_device),)),
        "one_group": ({}, ((trainer, "param_groups", one_group),)),
        # (its lr tensor does not go into a checkpoint's optimizer.json: no saving)
        "compiled_loss": ({}, ((trainer, "FUSED_LOSS_ON_GPU", False),)),
        "clip_grad_norm": ({}, ((trainer, "CLIP_IN_FUSED_ADAMW", False),)),
        "compiled_optimizer": ({}, ((trainer, "make_optimizer", compiled_optimizer),
                                    (trainer._Run, "_optimizer_step", compiled_optimizer_step),
                                    (trainer._Run, "_save", lambda run: None))),
    }
    out: dict = {}
    launch = trainer._Run._launch_step
    for name, (settings, patches) in variants.items():
        if name not in a.trainer_variants:
            continue
        if clock.left() < 45:
            out[name] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
            continue
        queued, prof, syncs = [], {}, {}

        def timed_launch(run, after, name=name, queued=queued, prof=prof, syncs=syncs):
            if name in a.trainer_profile and run.step in (15, 18):  # around steps 16..18
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if run.step == 15:
                    from torch.profiler import ProfilerActivity, profile

                    prof["p"] = profile(activities=[ProfilerActivity.CPU,
                                                    ProfilerActivity.CUDA])
                    prof["p"].__enter__()
                    prof["t0"] = time.perf_counter()
                else:
                    prof["wall_s"] = (time.perf_counter() - prof["t0"]) / 3
                    prof["p"].__exit__(None, None, None)
            watch = name == "default" and 19 <= run.step < 22 and device.type == "cuda"
            t0 = time.perf_counter()
            if watch:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        launched = launch(run, after)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                for w in caught:
                    where = f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}"
                    syncs[where] = syncs.get(where, 0) + 1
            else:
                launched = launch(run, after)
            queued.append(time.perf_counter() - t0)
            return launched

        grads: dict = {}  # the gradients' layouts, as the optimizer step gets them

        def looked_at(run, real=trainer._Run._optimizer_step, grads=grads):
            if not grads:
                got = [p.grad for p in run.model.parameters() if p.grad is not None]
                odd = [f"{tuple(g.shape)} stride {g.stride()} for {p.stride()}"
                       for p, g in ((p, p.grad) for p in run.model.parameters()
                                    if p.grad is not None) if g.stride() != p.stride()
                       or not g.is_contiguous()]
                grads.update(count=len(got), dtypes=sorted({str(g.dtype) for g in got}),
                             not_laid_out_as_their_parameter=odd)
            real(run)

        if name == "default":
            patches = (*patches, (trainer._Run, "_optimizer_step", looked_at))
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        trainer._Run._launch_step = timed_launch
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        try:
            torch._dynamo.reset()
            r = run_trainer(config, B, T, 30, device, **settings)
            r["python_ms_per_step"] = 1e3 * statistics.median(queued[5:])
            print(f"\ntrainer {name}: {r['tokens_per_s']:,.0f} tokens/s "
                  f"({B * T / r['tokens_per_s'] * 1e3:.1f} ms/step), Python to queue a "
                  f"step {r['python_ms_per_step']:.1f} ms")
            if name == "default":
                r["synchronising_calls_in_3_steps"] = syncs
                print(f"  synchronising CUDA calls while steps 20-22 were queued: {syncs}")
                r["gradients"] = grads
                odd = grads.get("not_laid_out_as_their_parameter", [])
                print(f"  gradients: {grads.get('count')} {grads.get('dtypes')}, {len(odd)} "
                      f"not laid out as their parameter: {odd[:4]}")
            if "wall_s" in prof:
                r["profiled_wall_ms_per_step"] = 1e3 * prof["wall_s"]
                print(f"  steps 16-18 profiled: {1e3 * prof['wall_s']:.1f} ms/step of wall time")
                r["profile"] = kernel_table(prof["p"], 3, limit=40)
            out[name] = r
        except Exception as e:
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            trainer._Run._launch_step = launch
            for obj, attr, value in saved:
                setattr(obj, attr, value)
        free(device)
    return out


# --------------------------------------------------------------------------- loss


def section_loss(a, clock: Clock) -> dict:
    """The training loss alone, forward and backward timed apart (CUDA events, median
    of 4 x --runs after 3 warm-ups): (16384, 50304) bf16 logits, the last 47 columns at
    -inf as the trainer's full-width head makes them. "compiled": torch.compile of
    F.cross_entropy(logits.float(), targets) (the trainer's before); then
    gpt2.gpu_kernels.cross_entropy (mean) at each setting of --loss-settings, BLOCKxWARPS
    (CE_BLOCK, and CE_NUM_WARPS = CE_BACKWARD_NUM_WARPS) or BLOCKxWARPSxBACKWARD_WARPS,
    its loss and gradient compared with the compiled one's."""
    import torch.nn.functional as F

    from gpt2 import gpu_kernels

    N, V, pad = 16384, 50257, 47
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, V + pad, device="cuda", generator=g) * 2).to(torch.bfloat16)
    logits[:, V:] = float("-inf")
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    runs = 4 * a.runs

    def measure(fn) -> tuple[dict, torch.Tensor, torch.Tensor]:
        times = {"forward": [], "backward": []}
        for i in range(3 + runs):
            x = logits.detach().requires_grad_()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            loss = fn(x, targets)
            marks[1].record()
            loss.backward()
            marks[2].record()
            torch.cuda.synchronize()
            if i >= 3:
                times["forward"].append(marks[0].elapsed_time(marks[1]))
                times["backward"].append(marks[1].elapsed_time(marks[2]))
        r = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
        return r, loss.detach(), x.grad

    out: dict = {}
    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))
    out["compiled"], want, want_grad = measure(compiled)
    print(f"\nloss {N} x {V + pad} bf16, forward / backward ms")
    print(f"  compiled F.cross_entropy            {out['compiled']['forward_ms']:6.3f} / "
          f"{out['compiled']['backward_ms']:6.3f}")
    names = ("CE_BLOCK", "CE_NUM_WARPS", "CE_BACKWARD_NUM_WARPS")
    saved = [getattr(gpu_kernels, n) for n in names]
    try:
        for setting in a.loss_settings:
            if clock.left() < 10:
                out[setting] = {"skipped": "time budget"}
                continue
            values = [int(v) for v in setting.split("x")]
            block, warps, back_warps = (values + values[-1:])[:3]
            for n, v in zip(names, (block, warps, back_warps), strict=True):
                setattr(gpu_kernels, n, v)
            r, loss, grad = measure(lambda x, t: gpu_kernels.cross_entropy(x, t).mean())
            r["loss_diff"] = abs(loss.item() - want.item())
            r["grad_max_abs_diff"] = (grad.float() - want_grad.float()).abs().max().item()
            out[f"fused_{setting}"] = r
            print(f"  fused, block {block:5d}, {warps:2d}/{back_warps:2d} warps  "
                  f"{r['forward_ms']:6.3f} / "
                  f"{r['backward_ms']:6.3f}   loss diff {r['loss_diff']:.1e}, grad "
                  f"{r['grad_max_abs_diff']:.1e}")
    finally:
        for n, v in zip(names, saved, strict=True):
            setattr(gpu_kernels, n, v)
    free(torch.device("cuda"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    p.add_argument("--sections", default="train,decode")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--train-variants",
                   default="compiled_with_loss,compiled_model_only,eager,eager_plain_head,"
                   "compiled_with_loss_plain_head,compiled_sliced_loss,"
                   "compiled_with_loss_flash_sdpa,compiled_with_loss_autotune,"
                   "compiled_with_loss_cudagraphs,compiled_with_loss_flash_cudagraphs")
    p.add_argument("--decode-variants", default="graph,graph_compiled_layer,graph_compiled_whole,"
                   "graph_compiled_layer_autotune,graph_compiled_layer_float_mask,"
                   "graph_compiled_layer_efficient_sdpa,graph_one_row,graph_one_row_tuned,"
                   "graph_one_row_sdpa,graph_one_row_sdpa_tuned,graph_compiled_layer_tuned,"
                   "graph_one_row_realize_tuned,graph_one_row_fused_tuned,"
                   "graph_compiled_layer_fused_tuned,graph_fused")
    p.add_argument("--trainer-variants",
                   default="default,no_clip,depth2,gpu_batches,one_group,compiled_optimizer,"
                   "compiled_loss,clip_grad_norm")
    p.add_argument("--trainer-profile", default="default",
                   help="trainer variants whose steps 16-18 are profiled (kernel tables)")
    p.add_argument("--loss-settings", default="4096x8x8,4096x8x16,2048x4x16,8192x8x16",
                   help="the loss section's settings: BLOCKxWARPS[xBACKWARD_WARPS]")
    p.add_argument("--decode-batch", type=int, default=1,
                   help="rows per decode step (the one-row step is used at 1 only)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="variants that would not fit in what is left are skipped")
    a = p.parse_args(argv)
    a.train_variants = set(a.train_variants.split(","))
    a.trainer_variants = set(a.trainer_variants.split(","))
    a.loss_settings = a.loss_settings.split(",")
    a.trainer_profile = set(a.trainer_profile.split(","))
    a.decode_variants = a.decode_variants.split(",")  # in this order
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device; nothing to profile")
        return 1
    torch._dynamo.config.cache_size_limit = 64
    clock = Clock(a.budget_s)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = Path(a.out) / "gpu_profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in a.sections.split(","):
        fn = {"train": section_train, "decode": section_decode, "trainer": section_trainer,
              "loss": section_loss}[name]
        result[name] = fn(a, clock)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {time.perf_counter() - clock.start:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
