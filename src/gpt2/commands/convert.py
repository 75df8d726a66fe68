"""`gpt2 convert SRC DST --to hf`: rewrite a checkpoint in the Hugging Face layout.

Reads any layout `GPT2.from_pretrained` reads (OpenAI/Kaggle TensorFlow folder,
Hugging Face folder or file, `gpt2 train` output) and writes a folder that
`transformers.GPT2LMHeadModel.from_pretrained(DST)` and
`GPT2TokenizerFast.from_pretrained(DST)` load: config.json, model.safetensors,
generation_config.json and the vocabulary (vocab.json, merges.txt, tokenizer
config; encoder.json and vocab.bpe too). The folder is assembled beside DST and
renamed into place at the end, so a failure never leaves half a model behind.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

NAME = "convert"
HELP = "write a checkpoint in the Hugging Face layout (loads in transformers)"

GPT2_VOCAB_SIZE = 50257


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", metavar="SRC",
        help="checkpoint folder/file (OpenAI/Kaggle, Hugging Face, `gpt2 train` output) "
        "or a size name fetched by `gpt2 download`",
    )
    parser.add_argument("dst", metavar="DST", help="the folder to write")
    parser.add_argument(
        "--to", choices=["hf"], default="hf",
        help="output layout: hf = Hugging Face (config.json + model.safetensors + vocabulary)",
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"],
        help="store the weights in this precision (default: as in SRC)",
    )
    parser.add_argument(
        "--quantize", choices=["int8"],
        help="write an int8 weight-only checkpoint (our format: HF names, int8 weights with "
        "per-channel scales; loads in `gpt2` without re-quantizing, not in transformers)",
    )
    parser.add_argument("--size", help="size folder to use inside a Kaggle download (e.g. 355M)")
    parser.add_argument("--force", action="store_true", help="replace DST if it is not empty")


def run(args: argparse.Namespace) -> int:
    from gpt2.weights import load_checkpoint, parse_dtype
    from gpt2.weights.huggingface import save_huggingface

    dst = Path(args.dst)
    check_destination(dst, force=args.force)  # before the slow part: reading the weights
    ckpt = load_checkpoint(args.src, size=args.size)
    check_not_inside(dst, ckpt.path)
    tokenizer, vocab_note = tokenizer_for(ckpt)
    dtype = parse_dtype(args.dtype)
    if args.quantize:
        return _convert_quantized(ckpt, dst, tokenizer, args)
    save_huggingface(
        ckpt.state_dict, ckpt.config, dst, tokenizer=tokenizer, dtype=dtype, overwrite=args.force
    )
    stored = args.dtype or str(next(iter(ckpt.state_dict.values())).dtype).removeprefix("torch.")
    n_params = sum(t.numel() for t in ckpt.state_dict.values())
    print(
        f"wrote {dst} (Hugging Face layout, {n_params:,} parameters, {stored}) from the "
        f"{ckpt.layout} checkpoint {ckpt.path}; {vocab_note}"
    )
    print(f"load it with GPT2LMHeadModel.from_pretrained({str(dst)!r}) or "
          f"--model {shlex.quote(str(dst))}")
    return 0


def _convert_quantized(ckpt, dst: Path, tokenizer, args: argparse.Namespace) -> int:
    import torch

    from gpt2.errors import GPT2Error
    from gpt2.model import GPT2
    from gpt2.quantize import quantize_model, save_quantized

    if args.dtype:
        raise GPT2Error("--quantize int8 sets the storage itself; drop --dtype")
    with torch.device("meta"):
        model = GPT2(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    ckpt.state_dict.clear()  # the model holds them: each float weight goes once quantized
    model = quantize_model(model.float().eval(), args.quantize)
    save_quantized(model, dst, tokenizer=tokenizer, overwrite=args.force)
    print(f"wrote {dst} (int8 weight-only, {ckpt.config.n_layer} layers) from the "
          f"{ckpt.layout} checkpoint {ckpt.path}; load it with --model {shlex.quote(str(dst))}")
    return 0


def check_destination(dst: Path, *, force: bool) -> None:
    from gpt2.errors import GPT2Error

    if dst.exists() and not dst.is_dir():
        raise GPT2Error(f"{dst}: exists and is not a folder; choose a folder name for DST")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise GPT2Error(f"{dst}: folder exists and is not empty; choose another or add --force")


def check_not_inside(dst: Path, src: Path) -> None:
    """Refuse a DST that would replace the source while it is being converted."""
    from gpt2.errors import GPT2Error

    dst, src = dst.resolve(), src.resolve()
    src_folder = src if src.is_dir() else src.parent
    if dst == src_folder or dst in src_folder.parents:
        raise GPT2Error(f"{dst}: DST holds the source checkpoint {src}; choose another folder")


def tokenizer_for(ckpt):
    """(tokenizer or None, a note saying which vocabulary was written).

    The checkpoint's own vocabulary files when it has them; the standard GPT-2
    vocabulary when the model has GPT-2's 50,257 tokens; otherwise none, since
    a custom vocabulary cannot be guessed.
    """
    from gpt2.tokenizer import Tokenizer

    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    if any((folder / f).is_file() for f in ("encoder.json", "vocab.json")):
        return Tokenizer.from_pretrained(folder), f"vocabulary copied from {folder}"
    if ckpt.config.n_vocab == GPT2_VOCAB_SIZE:
        return Tokenizer.from_pretrained(), "standard GPT-2 vocabulary written"
    return None, (
        f"no vocabulary written: SRC has no vocabulary files and its {ckpt.config.n_vocab} "
        "tokens are not GPT-2's 50,257"
    )
