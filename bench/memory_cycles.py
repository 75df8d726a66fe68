"""Memory of a long-lived process that loads, uses and drops a model again and again.

    python bench/memory_cycles.py [--cycles 4] [--new 140]
                                  [--engines ours-fp32,ours-bf16,ours-int8,hf-fp32]
                                  (also ours-int8wo: int8-weight-only)

What a notebook or a server does: build a random-weight 124M model, generate
--new greedy tokens twice (enough for gpt2's recorded CPU step, made once a model
has decoded 128 steps at a batch size), delete it, collect garbage, hand freed heap
back to the system (glibc's malloc_trim) and read the resident set. Each engine
runs in its own process; a model whose memory is not freed shows as growth per
cycle; "held" is the resident set while the last model is alive (after its use).
transformers' GPT2LMHeadModel is the yardstick. ours-bf16 needs a CPU with native
bf16 (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import ctypes, gc, json, sys, time
    import torch
    engine, cycles, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    libc = ctypes.CDLL("libc.so.6")

    def rss_mb():
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def ours(quantize):
        from gpt2 import GPT2, GPT2Config
        from gpt2.quantize import prepare_bf16, quantize_model
        with torch.device("meta"):
            model = GPT2(GPT2Config.preset("124M"))
        model.to_empty(device="cpu")
        model.reset_parameters()
        model = model.eval()
        if quantize == "bf16":
            model = prepare_bf16(model.to(torch.bfloat16))
        elif quantize:
            model = quantize_model(model, quantize)
        return lambda idx: model.generate(idx, max_new_tokens=new, temperature=0.0), model

    def hf():
        from transformers import GPT2Config as C, GPT2LMHeadModel
        model = GPT2LMHeadModel(C()).eval()
        def run(idx):
            with torch.no_grad():
                return model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        return run, model

    make = {"ours-fp32": lambda: ours(None), "ours-bf16": lambda: ours("bf16"),
            "ours-int8": lambda: ours("int8"),
            "ours-int8wo": lambda: ours("int8-weight-only"), "hf-fp32": hf}[engine]
    idx = torch.tensor([[464, 3290, 318, 257]])
    rows = [{"cycle": 0, "rss_mb": rss_mb()}]
    for cycle in range(1, cycles + 1):
        run, model = make()
        t = time.perf_counter()
        run(idx)
        run(idx)
        seconds = time.perf_counter() - t
        held = rss_mb()
        del run, model
        rows.append({"cycle": cycle, "rss_mb": rss_mb(), "held_mb": held,
                     "generate_s": seconds})
    print(json.dumps(rows))
""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--new", type=int, default=140, help="greedy tokens per generate call")
    p.add_argument("--engines", default="ours-fp32,ours-bf16,ours-int8,hf-fp32")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    results = {}
    print(f"{'engine':<10} {'after load/use/del, MB resident, per cycle':<44} "
          f"{'growth/cycle':>12} {'held':>8}")
    for engine in a.engines.split(","):
        r = subprocess.run([sys.executable, "-c", CHILD, engine, str(a.cycles), str(a.new)],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            print(f"{engine:<10} failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        rows = json.loads(r.stdout.strip().splitlines()[-1])
        results[engine] = rows
        # growth from the first cycle on (the first one also loads code and kernels)
        growth = (rows[-1]["rss_mb"] - rows[1]["rss_mb"]) / max(1, len(rows) - 2)
        trail = " ".join(f"{row['rss_mb']:.0f}" for row in rows)
        print(f"{engine:<10} {trail:<44} {growth:+9.1f} MB {rows[-1]['held_mb']:5.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
