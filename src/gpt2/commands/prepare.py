"""`gpt2 prepare FILES --out DIR`: tokenize text files into token files for training."""

from __future__ import annotations

import argparse

NAME = "prepare"
HELP = "tokenize text files into train.bin / val.bin / meta.json for `gpt2 train`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="UTF-8 text files; each file is one document")
    parser.add_argument("--out", "-o", required=True, metavar="DIR",
                        help="folder for train.bin, val.bin and meta.json (created if needed)")
    parser.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                        help="the last F of each document's tokens go to val.bin "
                        "(default: %(default)s)")
    parser.add_argument("--append-eot", action="store_true",
                        help="end every document with <|endoftext|> (default: only between "
                        "documents)")
    parser.add_argument("--vocab", metavar="DIR",
                        help="a folder with a vocabulary (encoder.json + vocab.bpe or vocab.json "
                        "+ merges.txt); default: GPT-2's")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from gpt2.train.data import prepare

    meta = prepare(args.files, out=args.out, val_fraction=args.val_fraction,
                   append_eot=args.append_eot, vocab=args.vocab, progress=not args.quiet)
    print(f"{args.out}: {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val "
          f"tokens from {len(meta['sources'])} file(s)")
    return 0
