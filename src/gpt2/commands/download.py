"""`gpt2 download SIZE`: fetch a released size, verify it and put it in the cache."""

from __future__ import annotations

import argparse
import shlex

NAME = "download"
HELP = "fetch a GPT-2 size from OpenAI's release, the Hugging Face hub or Kaggle, verified"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "size", metavar="SIZE",
        help="124M, 355M, 774M or 1558M (or gpt2, gpt2-medium, gpt2-large, gpt2-xl, 117M, 345M)",
    )
    parser.add_argument(
        "--source", choices=("openai", "hf", "kaggle"), default="openai",
        help="openai: OpenAI's public TF checkpoint (default, needs nothing extra); "
        "hf: the Hugging Face hub's safetensors (needs huggingface_hub); "
        "kaggle: the Kaggle mirror of OpenAI's files (needs kagglehub and a Kaggle API token)",
    )
    parser.add_argument(
        "--dir", metavar="D",
        help="put the size's folder under D instead of the cache ($GPT2_HOME or ~/.cache/gpt2)",
    )
    parser.add_argument(
        "--kaggle-handle", metavar="H",
        help="the Kaggle dataset to fetch from (default: $GPT2_KAGGLE_HANDLE or "
        "xhlulu/openai-gpt2-weights)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="fetch again from scratch even when a complete copy is already there",
    )


def run(args: argparse.Namespace) -> int:
    from gpt2.errors import GPT2Error
    from gpt2.weights import hub

    if args.kaggle_handle is not None and args.source != "kaggle":
        raise GPT2Error(f"--kaggle-handle is for --source kaggle, not {args.source}; "
                        "drop it or add --source kaggle")
    path = hub.download(
        args.size, source=args.source, dest=args.dir,
        kaggle_handle=args.kaggle_handle, force=args.force,
    )
    model = str(path) if args.dir else path.name.removesuffix("-hf")
    print(f"{path.name} is in {path}; use it with --model {shlex.quote(str(model))}")
    return 0
