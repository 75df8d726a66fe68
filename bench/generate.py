"""Generation speed: this project against transformers, side by side, same weights.

For the 124M geometry in fp32 (random weights; speed does not depend on them) it
measures, interleaving the two implementations run by run:

  decode b1   greedy generate, batch 1: a short prompt, then --new tokens (tokens/s)
  decode b8   the same with 8 prompts in one batch (new tokens of all rows per second)
  prefill     one forward over a --prefill-tokens prompt with the KV cache, last logits only

and the machine's memory bandwidth (a large tensor copy), which bounds batch-1
decoding: every step reads every weight once, so tokens/s <= bandwidth / weight bytes.
Both implementations first warm up for 160 decode steps or more: steady state,
which for ours includes the decode step recorded after 128 (gpt2.traced_step).

    python bench/generate.py                  # about 2-4 minutes on 2 cores
    python bench/generate.py --runs 7 --new 96 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="124M", help="geometry (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per case (median reported)")
    p.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length for decode")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decode")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    return p.parse_args()


def build_models(size: str):
    """Our GPT2 and transformers' GPT2LMHeadModel holding the same random weights."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from gpt2 import GPT2, GPT2Config
    from gpt2.weights.names import is_transposed, ours_to_hf

    config = GPT2Config.preset(size)
    ours = GPT2(config).eval()  # GPT-2's own initialisation: random and well scaled
    hf = GPT2LMHeadModel(HFConfig(
        vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
        n_head=config.n_head, n_layer=config.n_layer, attn_implementation="sdpa",
    )).eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            target = hf_params[ours_to_hf(name)]
            target.copy_(p.t() if is_transposed(name) else p)
    hf.tie_weights()
    return ours, hf, config


def copy_bandwidth(n_bytes: int = 1 << 28, repeats: int = 10) -> float:
    """Bytes read + written per second by a large tensor copy (median of repeats)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from gpt2.generate import generate

    ours, hf, config = build_models(args.size)
    g = torch.Generator().manual_seed(0)
    prompt1 = torch.randint(0, config.n_vocab, (1, args.prompt_tokens), generator=g)
    promptb = torch.randint(0, config.n_vocab, (args.batch, args.prompt_tokens), generator=g)
    long_prompt = torch.randint(0, config.n_vocab, (1, args.prefill_tokens), generator=g)

    def ours_decode(idx):
        return generate(ours, idx, max_new_tokens=args.new, temperature=0.0)

    def hf_decode(idx):
        with torch.no_grad():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                               max_new_tokens=args.new, min_new_tokens=args.new,
                               eos_token_id=None, pad_token_id=0, use_cache=True)

    def ours_prefill():
        with torch.inference_mode():
            cache = ours.new_cache(1, max_len=args.prefill_tokens)
            ours(long_prompt, cache=cache, last_only=True)

    def hf_prefill():
        with torch.no_grad():
            hf(long_prompt, use_cache=True, logits_to_keep=1)

    cases = {
        "decode b1": (lambda: ours_decode(prompt1), lambda: hf_decode(prompt1), args.new),
        f"decode b{args.batch}": (lambda: ours_decode(promptb), lambda: hf_decode(promptb),
                                  args.new * args.batch),
        "prefill": (ours_prefill, hf_prefill, args.prefill_tokens),
    }

    same = torch.equal(ours_decode(prompt1), hf_decode(prompt1))  # also the warm-up
    print(f"greedy tokens identical to transformers: {same}", file=sys.stderr)
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    # warm-up: enough decode steps for every engine's steady state (ours records its CPU
    # decode step after gpt2.traced_step.RECORD_AFTER_STEPS steps at a batch size)
    for _ in range(max(1, math.ceil(160 / args.new))):
        for a, b, _ in cases.values():
            a(), b()
    for run in range(args.runs):
        for name, (a, b, _) in cases.items():
            first, second = (a, b) if run % 2 == 0 else (b, a)  # alternate who goes first
            t1, t2 = timed(first), timed(second)
            ours_t, hf_t = (t1, t2) if run % 2 == 0 else (t2, t1)
            times[name][0].append(ours_t)
            times[name][1].append(hf_t)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    bandwidth = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters()) \
        - ours.wpe.weight.numel() * ours.wpe.weight.element_size()  # wpe: one row per token
    bound = bandwidth / weight_bytes

    results = {"size": args.size, "threads": args.threads, "dtype": "fp32",
               "torch": torch.__version__, "greedy_tokens_identical": same,
               "copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes,
               "decode_bound_tokens_per_s": bound, "cases": {}}
    print(f"\n{args.size} fp32, {args.threads} threads, medians of {args.runs} runs")
    print(f"{'case':<12}{'ours tok/s':>12}{'HF tok/s':>12}{'ours/HF':>10}")
    for name, (_, _, n_tokens) in cases.items():
        ours_rate = n_tokens / statistics.median(times[name][0])
        hf_rate = n_tokens / statistics.median(times[name][1])
        results["cases"][name] = {"ours_tokens_per_s": ours_rate, "hf_tokens_per_s": hf_rate,
                                  "ratio": ours_rate / hf_rate}
        print(f"{name:<12}{ours_rate:>12.1f}{hf_rate:>12.1f}{ours_rate / hf_rate:>9.2f}x")
    b1 = results["cases"]["decode b1"]["ours_tokens_per_s"]
    results["decode_b1_share_of_bound"] = b1 / bound
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); weights "
          f"{weight_bytes / 1e6:.0f} MB per token -> bound {bound:.1f} tokens/s; "
          f"ours at batch 1: {b1 / bound:.0%} of it")
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
