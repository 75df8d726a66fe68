"""Do the inspection tap points cost anything when no hook is set?

Every intermediate of `GPT2.forward` passes through `tap(name, x)`, which is a
do-nothing function until `model.hooks(...)` or `model.run_with_cache(...)` is
active. This script times the forward pass side by side:

  reference      a copy of the model that has never had a hook set
  after hooks    the model after a `hooks` context was entered and left
  hooks({})      inside a `hooks` context with no functions (every tap looks up a dict)
  1 read hook    one hook that reads `blocks.0.resid_mid` and returns None
  cache 1 name   `run_with_cache(names=["ln_final"])`
  HF transformers  GPT2LMHeadModel with the same weights (the competitor), if installed

Rounds are interleaved (A B C ... A B C ...) so that drift in the machine's
speed hits every row alike; each row reports the median and its ratio to the
reference.

    python bench/hooks.py                    # 124M geometry, 128 tokens, CPU, 1 thread
    python bench/hooks.py --size tiny --tokens 16 --rounds 300
    python bench/hooks.py --device cuda --tokens 1024 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from gpt2.config import GPT2Config
from gpt2.model import GPT2


def timer(device: torch.device):
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run


def hf_twin(model: GPT2):
    """transformers' GPT-2 holding our weights (Conv1D stores Linear weights transposed)."""
    try:
        from transformers import GPT2Config as HFConfig
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    c = model.config
    hf = GPT2LMHeadModel(HFConfig(
        vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_head=c.n_head,
        n_layer=c.n_layer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
        bos_token_id=50256 if c.n_vocab > 50256 else None,  # GPT-2's <|endoftext|>, if any
        eos_token_id=50256 if c.n_vocab > 50256 else None,
    ))
    state = {}
    for name, tensor in model.state_dict().items():
        is_linear = name.endswith(".weight") and ("c_attn" in name or "c_fc" in name
                                                  or "c_proj" in name)
        state[f"transformer.{name}"] = tensor.t() if is_linear else tensor
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf.to(model.wte.weight.device, model.wte.weight.dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="124M",
                   help="geometry (random weights): 124M, 355M, ..., or 'tiny' (12 layers of "
                   "width 64, vocabulary 512: Python overhead dominates, the worst case for taps)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers row")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the table shows quartiles)")
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    config = (GPT2Config(n_layer=12, n_head=4, n_embd=64, n_vocab=512, n_ctx=128)
              if args.size == "tiny" else GPT2Config.preset(args.size))
    reference = GPT2(config).to(device, dtype).eval()
    model = copy.deepcopy(reference)
    with model.hooks({}):  # used once, then left: the state "no hook set"
        pass
    idx = torch.randint(0, model.config.n_vocab, (args.batch, args.tokens), device=device)

    def inside_empty_hooks() -> None:
        with model.hooks({}):
            model(idx)

    def one_read_hook() -> None:
        with model.hooks({"blocks.0.resid_mid": lambda x: None}):
            model(idx)

    rows = {
        "reference (never hooked)": lambda: reference(idx),
        "no hook set (after hooks)": lambda: model(idx),
        "inside hooks({})": inside_empty_hooks,
        "1 read-only hook": one_read_hook,
        "run_with_cache(1 name)": lambda: model.run_with_cache(idx, names=["ln_final"]),
    }
    hf = None if args.no_hf else hf_twin(reference)
    if hf is not None:
        with torch.inference_mode():  # the same network, or the comparison means nothing
            diff = (hf(idx).logits - reference(idx)).abs().max().item()
        if diff > (1e-3 if dtype == torch.float32 else 0.5):
            raise SystemExit(f"transformers' twin differs from our model by {diff}")
        rows["HF transformers (sdpa)"] = lambda: hf(idx).logits

    run = timer(device)
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for fn in rows.values():  # warm-up: allocator, kernels, lazy init
            for _ in range(3):
                fn()
        for _ in range(args.rounds):
            for name, fn in rows.items():
                times[name].append(run(fn))

    base = statistics.median(times["reference (never hooked)"])
    print(f"GPT-2 {args.size} geometry (random weights), batch {args.batch} x {args.tokens} "
          f"tokens, {args.device} {args.dtype}, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'':28}{'median ms':>10}{'min ms':>9}{'IQR ms':>9}{'vs reference':>14}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"{name:<28}{1e3 * med:>10.2f}{1e3 * min(ts):>9.2f}{1e3 * (q[2] - q[0]):>9.2f}"
              f"{med / base:>13.3f}x")


if __name__ == "__main__":
    main()
