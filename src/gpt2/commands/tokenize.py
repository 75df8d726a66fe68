"""`gpt2 tokenize`: the token ids of a text, the text of some ids, or the merges in between.

    gpt2 tokenize "hello world"              -> 31373 995
    gpt2 tokenize --json "hello world"       -> {"ids": [31373, 995], "tokens": ["hello", " world"]}
    gpt2 tokenize --show "hello world"       -> every word, every merge, every id
    echo "hello" | gpt2 tokenize -           (stdin; its final newline is part of the text)
    gpt2 tokenize --decode 31373 995         -> hello world
"""

from __future__ import annotations

import argparse
import sys

NAME = "tokenize"
HELP = "the GPT-2 token ids of a text (or, with --decode, the text of some ids)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "text", nargs="*", metavar="TEXT",
        help="the text (several arguments are joined with spaces); '-' or nothing reads "
             "stdin; with --decode, the token ids",
    )
    parser.add_argument("--file", "-f", metavar="FILE", help="read the text (or ids) from FILE")
    parser.add_argument("--decode", "-d", action="store_true",
                        help="turn token ids (separated by spaces or commas) back into text")
    parser.add_argument("--json", action="store_true",
                        help='print JSON: {"ids": [...], "tokens": [...]} (with --show: the '
                             "whole trace; with --decode: {\"ids\", \"text\"})")
    parser.add_argument("--show", action="store_true",
                        help="show the work: each pre-tokenized word, each merge, the ids")
    parser.add_argument("--vocab", metavar="DIR",
                        help="use the vocabulary files in DIR (encoder.json + vocab.bpe, or "
                             "vocab.json + merges.txt), e.g. a checkpoint folder")
    parser.add_argument("--allow-special", action="store_true",
                        help="encode the text <|endoftext|> as the special token 50256 "
                             "(by default it is ordinary text)")


def run(args: argparse.Namespace) -> int:
    from gpt2.errors import GPT2Error
    from gpt2.tokenizer import Tokenizer

    if args.file is not None and args.text:
        raise GPT2Error("give the input as TEXT or as --file FILE, not both")
    if args.decode and (args.show or args.allow_special):
        raise GPT2Error("--decode cannot be combined with --show or --allow-special")
    source = _read_input(args)
    tok = Tokenizer.from_pretrained(args.vocab)
    if args.decode:
        return _decode(tok, source, as_json=args.json)

    allowed = "all" if args.allow_special else frozenset()
    if args.show:
        explanation = tok.explain(source, allowed_special=allowed)
        if args.json:
            _write(_dumps(_asdict(explanation)) + "\n")
        else:
            _write(explanation.render() + "\n")
        return 0
    ids = tok.encode(source, allowed_special=allowed)
    if args.json:
        tokens = [tok.decode([i]) for i in ids]
        _write(_dumps({"ids": ids, "tokens": tokens}) + "\n")
    else:
        _write(" ".join(map(str, ids)) + "\n")
    return 0


def _read_input(args: argparse.Namespace) -> str:
    """The text to work on, from the arguments, --file or stdin, as strict UTF-8."""
    from gpt2._io import decode_utf8
    from gpt2.errors import GPT2Error

    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise GPT2Error(f"cannot read {args.file}: {e.strerror}") from None
        return decode_utf8(data, args.file)
    if args.text and args.text != ["-"]:
        return " ".join(args.text)
    if not args.text and sys.stdin.isatty():
        raise GPT2Error("nothing to read: give TEXT, '-' to read stdin, or --file FILE")
    return decode_utf8(sys.stdin.buffer.read(), "stdin")


def _decode(tok, source: str, *, as_json: bool) -> int:
    import re

    from gpt2.errors import GPT2Error

    ids = []
    items = source.replace("[", " ").replace("]", " ").split(",")
    for number, item in enumerate(items, 1):
        words = item.split()
        if not words and len(items) > 1:  # "1,,2": an id left out, not a separator
            raise GPT2Error(f"--decode: item {number} between commas is empty (ids are "
                            "integers, separated by spaces or single commas)")
        for word in words:
            if not re.fullmatch(r"-?[0-9]+", word):  # int() also takes "1_0", "+1", "٣"
                raise GPT2Error(f"--decode: {word[:40]!r} is not a token id (ids are "
                                "integers, separated by spaces or commas)")
            ids.append(int(word))
            if not 0 <= ids[-1] < tok.n_vocab:
                raise GPT2Error(f"--decode: token id {ids[-1]} is out of range (this "
                                f"vocabulary has ids 0 to {tok.n_vocab - 1})")
    text = tok.decode(ids)
    if as_json:
        _write(_dumps({"ids": ids, "text": text}) + "\n")
        return 0
    # The text exactly, so `gpt2 tokenize - <f | gpt2 tokenize --decode` gives f back;
    # a newline only to keep a terminal's prompt off the last line.
    _write(text)
    if sys.stdout.isatty() and not text.endswith("\n"):
        _write("\n")
    return 0


def _asdict(explanation) -> dict:
    import dataclasses

    out = dataclasses.asdict(explanation)
    out["ids"] = explanation.ids
    return out


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def _write(text: str) -> None:
    # Write UTF-8 whatever the locale says, so any text (and U+FFFD) can be printed.
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    buffer.write(text.encode("utf-8"))
    buffer.flush()
