"""`gpt2 validate MODEL`: load a checkpoint, show what it holds, and run it once.

The seed's "verify shapes, run inference": the layout found, the config, every
tensor with its shape, the parameter count, and the loss of the model on a short
sample text. Loading already checks every name and shape against the config and
fails with a one-line error naming the tensor; this command shows the result.
"""

from __future__ import annotations

import argparse
import json

NAME = "validate"
HELP = "check a checkpoint: layout, config, tensor shapes, parameter count and a forward pass"

# A sample for the forward pass: ordinary English, long enough for a stable loss.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In the beginning of the year, the "
    "city council met to discuss the new budget, which included money for schools, "
    "roads and the public library. Most members agreed that the plan was a good one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL",
        help="size name (124M, gpt2-medium, ...) fetched by `gpt2 download`, or a checkpoint "
        "folder/file (OpenAI/Kaggle, Hugging Face, .safetensors, `gpt2 train` output)",
    )
    parser.add_argument("--size", help="size folder to use inside a Kaggle download (e.g. 355M)")
    parser.add_argument("--text", help="the sample text for the forward pass (default: built in)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"],
        help="cast the weights to this precision (default: as stored)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2.commands._common import resolve_device
    from gpt2.errors import GPT2Error
    from gpt2.model import GPT2

    if args.text == "":
        raise GPT2Error("--text is empty; give a sample of at least 2 tokens (or leave it "
                        "out for the built-in one)")
    device = resolve_device(args.device)
    model = GPT2._load(args.model, size=args.size, dtype=args.dtype, device=device,
                       quantize=None, fp32_where_emulated=False)  # the tensors as stored
    report = describe(model)
    with torch.no_grad():
        report["sample"] = sample_loss(model, SAMPLE_TEXT if args.text is None else args.text,
                                       device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


def describe(model) -> dict:
    """The static part of the report: where the weights came from and what they are."""
    import torch

    from gpt2.errors import GPT2Error
    from gpt2.quantize import quantized_state_dict

    source = model.source
    # a quantized model's tensors under the checkpoint's names (its int8 head is wte)
    state = quantized_state_dict(model) if getattr(model, "quantization", None) \
        else model.state_dict()
    tensors = [
        {"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
        for name, p in state.items()
    ]
    # every value, not only those a short forward pass reads (wpe's rows past the sample)
    damaged = [name for name, p in state.items()
               if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3
                                          else "")
        raise GPT2Error(f"{source.path}: {shown} hold NaN or infinite values; the weights are "
                        "damaged (get the checkpoint again)")
    return {
        "path": str(source.path),
        "layout": source.layout,
        "config": model.config.to_hparams(),
        "tensors": tensors,
        "parameters": model.num_parameters(),
        "bytes": sum(p.numel() * p.element_size() for p in state.values()),
    }


def sample_loss(model, text: str, device) -> dict:
    """Mean next-token cross-entropy of `text` under the model, and what it rests on.

    Uses the checkpoint folder's own vocabulary when it has one, else the standard
    GPT-2 one. A model whose vocabulary is smaller than the tokenizer's (a custom
    tiny model) cannot read real text: it gets the ids 0, 1, 2, ... instead, so the
    forward pass still runs and the report says so.
    """
    import torch
    import torch.nn.functional as F

    from gpt2.commands._common import has_vocab_files, load_tokenizer_for
    from gpt2.errors import GPT2Error

    n_vocab, n_ctx = model.config.n_vocab, model.config.n_ctx
    tokenizer = load_tokenizer_for(model.source.path)
    if tokenizer.n_vocab > n_vocab and has_vocab_files(model.source.path):
        raise GPT2Error(f"{model.source.path}: the vocabulary files beside the model have "
                        f"{tokenizer.n_vocab} tokens but the model {n_vocab}: they are not "
                        "its vocabulary, and every command would refuse its text; put the "
                        "model's own there")
    if tokenizer.n_vocab <= n_vocab:
        ids, what = tokenizer.encode(text), "text"
    else:
        ids, what = list(range(min(64, n_vocab))), "ids 0..n (vocabulary smaller than GPT-2's)"
    ids = ids[:n_ctx]
    if len(ids) < 2:
        raise GPT2Error("--text: the sample needs at least 2 tokens to score a prediction")
    idx = torch.tensor([ids], device=device)  # (1, T)
    logits = model(idx).float()  # (1, T, n_vocab)
    if not torch.isfinite(logits).all():
        raise GPT2Error(
            f"{model.source.path}: the forward pass gave NaN or infinite logits; the weights "
            "are damaged (or too large for --dtype fp16)"
        )
    loss = F.cross_entropy(logits[0, :-1], idx[0, 1:]).item()  # predict token t+1 from <= t
    return {"input": what, "tokens": len(ids), "loss": loss, "perplexity": _exp(loss)}


def render(report: dict) -> str:
    c = report["config"]
    lines = [
        f"path:       {report['path']}",
        f"layout:     {report['layout']}",
        "config:     " + ", ".join(f"{k}={v}" for k, v in c.items()),
        "",
    ]
    width = max(len(t["name"]) for t in report["tensors"])
    lines.append(f"{'tensor':<{width}}  {'shape':<14}  dtype")
    for t in report["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        lines.append(f"{t['name']:<{width}}  {shape:<14}  {t['dtype']}")
    s = report["sample"]
    lines += [
        "",
        f"tensors:    {len(report['tensors'])}, every shape as the config expects",
        f"parameters: {report['parameters']:,} ({report['bytes'] / 1e6:,.1f} MB; "
        "lm_head tied to wte, counted once)",
        f"forward:    {s['tokens']} tokens of {s['input']}: loss {s['loss']:.4f} "
        f"(perplexity {_fmt(s['perplexity'])})",
    ]
    return "\n".join(lines)


def _exp(x: float) -> float | None:
    import math

    return math.exp(x) if x < 700 else None  # None: too large to print (or to be JSON)


def _fmt(x: float | None) -> str:
    return "overflow" if x is None else f"{x:,.2f}"
