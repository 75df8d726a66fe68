"""Gradient clipping in the `gpt2 train --compile` loop, two ways, runs alternated in one
process: clip_grad_norm_ then the fused AdamW, or the clip folded into the fused AdamW
as its grad_scale (gpt2.train.trainer.CLIP_IN_FUSED_ADAMW); then no clipping.

    python bench/clip_ab.py [--out DIR]     # a CUDA GPU; ~70 s on an H200
    python bench/clip_ab.py --dry-run       # a tiny model on the CPU: the script runs

124M, 16 x 1024, bf16, 30 steps a run (bench/gpu.py's run_trainer: the median of the
tokens/s the loop logs after its first five steps). Writes DIR/clip_ab.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpt2.train.trainer as trainer  # noqa: E402
import gpu  # noqa: E402  (bench/gpu.py)
from gpt2._io import atomic_write_text  # noqa: E402
from gpt2.config import GPT2Config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-out")
    p.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    a = p.parse_args()
    if a.dry_run:
        config, device, B, T = gpu.TINY, torch.device("cpu"), 2, 32
    elif torch.cuda.is_available():
        config, device, B, T = GPT2Config.preset("124M"), torch.device("cuda"), 16, 1024
    else:
        print("clip_ab.py: needs a CUDA GPU (the fused AdamW and the compiled loop), "
              "or --dry-run", file=sys.stderr)
        return 1
    results = []
    for name in ("clip_grad_norm", "clip_in_adamw", "clip_grad_norm", "clip_in_adamw",
                 "no_clip"):
        trainer.CLIP_IN_FUSED_ADAMW = name == "clip_in_adamw"
        torch._dynamo.reset()
        settings = {"grad_clip": 0.0} if name == "no_clip" else {}
        r = gpu.run_trainer(config, B, T, 8 if a.dry_run else 30, device, **settings)
        print(f"{name:15s} {r['tokens_per_s']:,.0f} tokens/s (steps 6..30: "
              f"{r['min_tokens_per_s']:,.0f}-{r['max_tokens_per_s']:,.0f})", flush=True)
        results.append({"variant": name, **r})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.out) / "clip_ab.json", json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
