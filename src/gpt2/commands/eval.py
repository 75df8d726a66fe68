"""`gpt2 eval --model M --data DIR`: loss and perplexity of a prepared split."""

from __future__ import annotations

import argparse
import json
import math

from gpt2.commands._common import add_model_arguments

NAME = "eval"
HELP = "validation loss and perplexity of a model on a split prepared by `gpt2 prepare`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="DIR", help="a folder made by `gpt2 prepare`")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which token file (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens the window moves each time (default: the window length)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpt2.commands._common import load_model
    from gpt2.errors import GPT2Error
    from gpt2.score import score
    from gpt2.train.data import open_tokens

    data = open_tokens(args.data)
    tokens = data.split(args.split)
    if len(tokens) < 2:
        raise GPT2Error(f"{args.data}: the {args.split} split has {len(tokens)} tokens; "
                        "nothing to score (prepare more text or a larger --val-fraction)")
    model, tok = load_model(args)
    data.check_vocab_of(tok, args.model)
    n_vocab = data.n_vocab or 0
    if n_vocab > model.config.n_vocab:
        raise GPT2Error(f"{args.data} holds token ids up to {n_vocab - 1} but the model has "
                        f"{model.config.n_vocab}; prepare the data with the model's vocabulary")
    result = score(model, tokens, stride=args.stride, max_length=args.max_length)
    if args.json:
        print(json.dumps({"split": args.split, "tokens": result.tokens, "loss": result.nll,
                          "total_nll": result.total_nll,  # (null: overflow)
                          "ppl": result.ppl if math.isfinite(result.ppl) else None}))
    else:
        ppl = f"{result.ppl:.3f}" if math.isfinite(result.ppl) else "overflow"
        print(f"{args.split}: {result.tokens:,} tokens, loss {result.nll:.4f} nats/token, "
              f"perplexity {ppl}")
    return 0
