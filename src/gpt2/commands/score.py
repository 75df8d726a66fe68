"""`gpt2 score FILE`: how well the model predicts a text (NLL, perplexity, bits per byte)."""

from __future__ import annotations

import argparse

NAME = "score"
HELP = "log-likelihood and perplexity of a text under the model (sliding window)"

EPILOG = """\
Windows of --max-length tokens start every --stride tokens; each token is scored
once, from the tokens before it in its window. The first token is only context
unless --bos puts <|endoftext|> before it. Bits per byte = total NLL / ln 2 / the
number of UTF-8 bytes of the scored tokens: the whole file with --bos, the file
minus its first token's bytes without.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt2.commands._common import add_model_arguments

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("file", metavar="FILE", help="UTF-8 text file to score ('-' for stdin)")
    add_model_arguments(parser)
    parser.add_argument("--stride", type=int, metavar="S",
                        help="tokens between window starts (default: --max-length)")
    parser.add_argument("--max-length", type=int, metavar="L",
                        help="window length in tokens (default: the model's context, 1024)")
    parser.add_argument("--bos", action="store_true",
                        help="put <|endoftext|> first so the first token is scored too")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help='print {"tokens", "nll", "ppl", "bits_per_byte"} as JSON')
    parser.add_argument("--per-token", action="store_true",
                        help="also each scored token's NLL: a line per token (position, id, "
                        'NLL, text), or with --json a "per_token" list of {"id", "text", '
                        '"nll"}')


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from gpt2.commands._common import check_ids_fit, load_model, read_text_file
    from gpt2.errors import GPT2Error
    from gpt2.score import score

    # What can be checked without the model is checked before loading it.
    if args.stride is not None and args.stride < 1:
        raise GPT2Error(f"--stride must be >= 1, got {args.stride}")
    if args.max_length is not None and args.max_length < 2:
        raise GPT2Error(f"--max-length must be >= 2 (a token and the one it predicts), got "
                        f"{args.max_length}")
    if args.batch_size < 1:
        raise GPT2Error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise GPT2Error(f"--stride ({args.stride}) must not exceed --max-length "
                        f"({args.max_length})")
    text = read_text_file(args.file)
    model, tokenizer = load_model(args)
    ids = tokenizer.encode(text)
    check_ids_fit(ids, model, args.file)
    if len(ids) < 2 and not args.bos:
        raise GPT2Error(f"{args.file}: the text is {len(ids)} token(s); scoring needs at "
                        "least two (the first is only context), or pass --bos to score one")
    if not ids:
        raise GPT2Error(f"{args.file}: the text is empty; nothing to score")
    result = score(model, ids, stride=args.stride, max_length=args.max_length, bos=args.bos,
                   batch_size=args.batch_size, per_token=args.per_token)
    scored = ids if args.bos else ids[1:]  # the tokens result.token_nll is about
    scored_bytes = len(text.encode("utf-8")) if args.bos else len(
        tokenizer.decode_bytes(ids[1:]))
    bits_per_byte = result.total_nll / math.log(2) / scored_bytes
    if args.json:
        out = {"tokens": result.tokens, "nll": result.nll,  # (null: overflow)
               "ppl": result.ppl if math.isfinite(result.ppl) else None,
               "bits_per_byte": bits_per_byte}
        if args.per_token:
            out["per_token"] = [{"id": i, "text": tokenizer.decode([i]), "nll": float(n)}
                                for i, n in zip(scored, result.token_nll, strict=True)]
        print(json.dumps(out))
    else:
        if args.per_token:
            print(f"{'position':>8}  {'id':>6}  {'NLL':>8}  text")
            first = 0 if args.bos else 1
            for k, (i, n) in enumerate(zip(scored, result.token_nll, strict=True)):
                print(f"{first + k:>8}  {i:>6}  {n:>8.4f}  {tokenizer.decode([i])!r}")
            print()
        print(f"tokens scored   {result.tokens}")
        print(f"mean NLL        {result.nll:.4f} nats/token")
        print(f"perplexity      {result.ppl:.4f}" if math.isfinite(result.ppl)
              else "perplexity      overflow (more than 1.8e308)")
        print(f"bits per byte   {bits_per_byte:.4f}")
    return 0
