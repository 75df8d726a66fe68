"""Time and peak memory to load GPT-2 124M, ours against transformers, from each layout.

    python bench/load.py [--repeat 3] [--dir D] [--tf-python /tmp/tfenv/bin/python]

Writes a random-weight 124M checkpoint (every tensor random) once into --dir:
  hf-safetensors/  transformers' save_pretrained (config.json + model.safetensors)
  hf-bin/          config.json + pytorch_model.bin (torch.save of the same state dict)
  openai/          OpenAI's layout written by TensorFlow itself (hparams.json + model.ckpt.*),
                   only when --tf-python points at a Python with TensorFlow
Each measurement runs in a fresh subprocess: the library is imported first, then
the clock and the resident set (VmRSS) are read, the checkpoint is loaded, and the
time and the peak (VmHWM) are read again. "growth" is peak minus the RSS before
loading, over the weights' 497.8 MB. Files are read from a warm page cache (the
first, discarded run warms it). For the OpenAI layout the competitor is TensorFlow
reading every tensor (transformers 5 no longer reads TF checkpoints). Both libraries
map the file; ours copies the projection weights it transposes into nn.Linear's
layout (gpt2.weights.mapping), transformers' Conv1D uses the file's layout as it is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_BYTES = 124_439_808 * 4

PROBE = textwrap.dedent("""
    import json, sys, time
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    who, path = sys.argv[1], sys.argv[2]
    if who == "ours":
        from gpt2.model import GPT2
        load = lambda: GPT2.from_pretrained(path)
    elif who == "transformers":
        from transformers import GPT2LMHeadModel
        load = lambda: GPT2LMHeadModel.from_pretrained(path)
    else:  # tensorflow: read every tensor of the checkpoint into memory
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        def load():
            reader = tf.train.load_checkpoint(path + "/model.ckpt")
            return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
    before = status("VmRSS")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    growth = status("VmHWM") - before
    if who != "tensorflow":  # the first logits: a lazily mapped file is read only now
        import torch
        with torch.no_grad():
            model(torch.tensor([[464, 3290, 318, 257, 1332, 286, 262, 3303]]))
    print(json.dumps({"seconds": seconds, "first": time.perf_counter() - t0,
                      "growth": growth}))
""")

TF_WRITER = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("maker", sys.argv[1])
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # OpenAI's names and shapes, TensorFlow's Saver
    tf = maker.tf
    tf.compat.v1.disable_eager_execution()
    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    hp = dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
    variables = []
    for name, shape in maker.openai_shapes(hp).items():
        scope, leaf = name.rsplit("/", 1)
        # a random initializer op, not a constant: keeps 500 MB out of the graph proto
        init = tf.compat.v1.random_normal_initializer(stddev=0.1, seed=len(variables))
        with tf.compat.v1.variable_scope(scope):
            variables.append(tf.compat.v1.get_variable(
                leaf, shape=shape, dtype=tf.float32, initializer=init))
    maker.save(folder, variables)
    (folder / "hparams.json").write_text(json.dumps(hp))
""")


def write_checkpoints(folder: Path, tf_python: str | None) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_hf_model
    from gpt2.config import PRESETS

    paths = {"hf-safetensors": folder / "hf-safetensors", "hf-bin": folder / "hf-bin"}
    if not (paths["hf-safetensors"] / "model.safetensors").is_file():
        print("writing a random 124M checkpoint (transformers)...", file=sys.stderr)
        hf = make_hf_model(PRESETS["124M"], seed=0)
        hf.save_pretrained(paths["hf-safetensors"])
        paths["hf-bin"].mkdir(parents=True, exist_ok=True)
        (paths["hf-bin"] / "config.json").write_bytes(
            (paths["hf-safetensors"] / "config.json").read_bytes())
        torch.save(hf.state_dict(), paths["hf-bin"] / "pytorch_model.bin")
    if tf_python and Path(tf_python).is_file():
        openai = folder / "openai"
        if not (openai / "model.ckpt.index").is_file():
            print("writing a random 124M OpenAI checkpoint (TensorFlow)...", file=sys.stderr)
            maker = ROOT / "tests" / "fixtures" / "make_tf_checkpoint.py"
            subprocess.run([tf_python, "-c", TF_WRITER, str(maker), str(openai)], check=True)
        paths["openai"] = openai
    return paths


def measure(python: str, who: str, path: Path, repeat: int) -> dict:
    """Best time and largest peak growth over `repeat` fresh processes (after one warm-up)."""
    runs = []
    for _ in range(repeat + 1):
        out = subprocess.run([python, "-c", PROBE, who, str(path)], capture_output=True,
                             text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    runs = runs[1:]
    return {"seconds": min(r["seconds"] for r in runs), "first": min(r["first"] for r in runs),
            "growth": max(r["growth"] for r in runs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/tmp/gpt2-load-bench", help="where the checkpoints go")
    p.add_argument("--tf-python", default="/tmp/tfenv/bin/python",
                   help="a Python with TensorFlow, to write and read the OpenAI layout")
    args = p.parse_args()

    paths = write_checkpoints(Path(args.dir), args.tf_python)
    rows = []
    for layout, path in paths.items():
        if layout == "openai":
            competitor = ("tensorflow", args.tf_python)
        else:
            competitor = ("transformers", sys.executable)
        ours = measure(sys.executable, "ours", path, args.repeat)
        theirs = measure(competitor[1], competitor[0], path, args.repeat)
        rows.append((layout, competitor[0], ours, theirs))

    print(f"GPT-2 124M load, weights {WEIGHT_BYTES / 1e6:.1f} MB, best of {args.repeat} "
          "fresh processes (warm page cache)")
    header = (f"{'layout':<15} {'ours s':>7} {'logits':>7} {'ours peak':>10} {'x wts':>6}   "
              f"{'competitor':<12} {'s':>7} {'logits':>7} {'peak':>10} {'x wts':>6}   "
              f"{'ratio':>6} {'logits':>7}")
    print(header)
    print("-" * len(header))
    for layout, name, ours, theirs in rows:
        print(
            f"{layout:<15} {ours['seconds']:>7.2f} {ours['first']:>7.2f} "
            f"{ours['growth'] / 1e6:>8.0f}MB {ours['growth'] / WEIGHT_BYTES:>6.2f}   "
            f"{name:<12} {theirs['seconds']:>7.2f} {theirs['first']:>7.2f} "
            f"{theirs['growth'] / 1e6:>8.0f}MB {theirs['growth'] / WEIGHT_BYTES:>6.2f}   "
            f"{theirs['seconds'] / ours['seconds']:>5.2f}x {theirs['first'] / ours['first']:>6.2f}x"
        )
    print("s: load; logits: load and the first forward pass of 8 tokens (both libraries map "
          "the file: what is not copied on the way in is read only then; TensorFlow only "
          "reads); "
          "ratio = competitor time / our time (> 1: we are faster); "
          "x wts = peak RSS growth during the load / weights' bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
