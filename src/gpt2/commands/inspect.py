"""`gpt2 inspect ...`: look inside the model — tokens, next-token table, attention maps,
logit lens, head ablation, and one HTML page holding all of them."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from gpt2.commands._common import add_model_arguments

NAME = "inspect"
HELP = "look inside: tokens, next-token table, attention maps, logit lens, head ablation, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="SUBCOMMAND", required=True)

    p = _add(sub, "tokens", "the BPE pieces and ids of a text (--merges: how each word merged)")
    p.add_argument("--merges", action="store_true", help="also show every merge of every word")
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of a table: a list of tokens (with --merges: '
                        '{"tokens": [...], "words": [...]}, each word with its merges)')

    p = _add(sub, "next", "the most likely next tokens and their probabilities")
    p.add_argument("--top", type=int, default=10, help="how many tokens (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _add(sub, "attention", "attention heatmaps as a PNG: one head, one layer, or all")
    p.add_argument("--layer", type=int, help="only this layer (its heads side by side)")
    p.add_argument("--head", type=int, help="only this head of --layer")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")

    p = _add(sub, "logit-lens", "the top next-token guess at every depth and position")
    p.add_argument("--out", metavar="FILE.png", help="write the grid as a PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _add(sub, "ablate", "the loss increase when each attention head is zeroed in turn",
             text="FILE")
    p.add_argument("--out", metavar="FILE.png", help="write the layers x heads map as a PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _add(sub, "report", "one self-contained HTML page with all of the above")
    p.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    p.add_argument("--top", type=int, default=10,
                   help="rows of the next-token table (default: %(default)s)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip head ablation (n_layer extra forward passes)")


def _add(sub, name: str, help: str, *, text: str = "TEXT") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    if text == "FILE":
        p.add_argument("file", metavar="FILE", help="a UTF-8 text file ('-' for stdin)")
    else:
        p.add_argument("text", metavar="TEXT", help="the text to look at ('-' for stdin)")
    add_model_arguments(p, model_only=name == "tokens")  # (tokens: its vocabulary only)
    return p


def run(args: argparse.Namespace) -> int:
    from gpt2.errors import GPT2Error

    if getattr(args, "top", 1) < 1:  # (before the model loads, under the flag's name)
        raise GPT2Error(f"--top must be >= 1, got {args.top}")
    handlers = {
        "tokens": _tokens, "next": _next, "attention": _attention,
        "logit-lens": _logit_lens, "ablate": _ablate, "report": _report,
    }
    return handlers[args.what](args)


# -- helpers -------------------------------------------------------------------------------


def _text(args) -> str:
    from gpt2.commands._common import read_text_arg, read_text_file

    return read_text_file(args.file) if hasattr(args, "file") else read_text_arg(args.text)


def _check_out(path: str | None, suffixes: tuple[str, ...]) -> None:
    """Fail before the model loads, not after minutes of work, on an output we cannot write."""
    from gpt2.errors import GPT2Error

    if path is None:
        return
    if not path.lower().endswith(suffixes):
        raise GPT2Error(f"--out {path}: the file name must end in {' or '.join(suffixes)}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise GPT2Error(f"--out {path}: is a folder; give a file name")
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise GPT2Error(f"--out {path}: {parent} is a file, not a folder; choose another path")
    if not os.path.isdir(parent):
        raise GPT2Error(f"--out {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
        why = "a read-only file system" if read_only else "permission denied"
        raise GPT2Error(f"--out {path}: cannot write in {parent} ({why})")


def _load(args, text: str, *, min_tokens: int = 1):
    from gpt2.commands._common import check_ids_fit, load_model
    from gpt2.inspect import encode_for_model

    model, tok = load_model(args)
    ids = encode_for_model(tok, text, n_ctx=model.config.n_ctx, min_tokens=min_tokens)
    check_ids_fit(ids, model, "the text")
    return model, tok, ids


def _print_json(obj) -> None:
    import json

    from gpt2.errors import GPT2Error

    try:  # NaN and Infinity are not JSON: a strict parser would refuse the output
        print(json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False))
    except ValueError:
        raise GPT2Error("the result holds NaN or infinite values, which JSON cannot hold "
                        "(the model overflows: try --dtype fp32)") from None


def _wrote(path: str) -> None:
    print(f"wrote {path}", file=sys.stderr)


# -- subcommands ----------------------------------------------------------------------------


def _tokens(args) -> int:
    from gpt2.inspect import token_pieces

    text = _text(args)
    tok = _tokenizer(args)
    pieces = token_pieces(tok, text)
    if args.json:
        rows = [{"position": k, "id": p.id, "token": p.label, "bytes": p.raw.hex()}
                for k, p in enumerate(pieces)]
        if args.merges:  # the rows, and each word's merges as `gpt2 tokenize --show --json`
            import dataclasses

            words = dataclasses.asdict(tok.explain(text))["words"]
            _print_json({"tokens": rows, "words": words})
        else:
            _print_json(rows)
        return 0
    if args.merges:
        print(tok.explain(text))
        return 0
    print(f"{len(pieces)} tokens (␣ is a space, ↵ a newline)")
    print(f"{'pos':>4}  {'id':>6}  token")
    for k, p in enumerate(pieces):
        print(f"{k:>4}  {p.id:>6}  {p.label}")
    return 0


def _tokenizer(args):
    """The checkpoint's vocabulary; a size that is not downloaded uses the standard one,
    which every released size shares."""
    from gpt2.commands._common import load_tokenizer_for
    from gpt2.config import resolve_size
    from gpt2.errors import GPT2Error
    from gpt2.tokenizer import Tokenizer
    from gpt2.weights.hub import resolve_model

    try:
        path = resolve_model(args.model)
    except GPT2Error:
        if resolve_size(args.model) is None:
            raise
        return Tokenizer.from_pretrained()
    return load_tokenizer_for(path)


def _next(args) -> int:
    from gpt2.inspect import next_tokens, token_labels

    model, tok, ids = _load(args, _text(args))
    predictions = next_tokens(model, ids, top=args.top)
    labels = token_labels(tok, [p.id for p in predictions])
    if args.json:
        _print_json([{"id": p.id, "token": s, "prob": p.prob}
                     for p, s in zip(predictions, labels, strict=True)])
        return 0
    print(f"{'#':>3}  {'prob':>7}  {'id':>6}  token")
    for k, (p, s) in enumerate(zip(predictions, labels, strict=True), 1):
        print(f"{k:>3}  {p.prob:>7.2%}  {p.id:>6}  {s}")
    return 0


def _attention(args) -> int:
    from gpt2.errors import GPT2Error

    if args.head is not None and args.layer is None:
        raise GPT2Error("--head needs --layer too (a head is numbered within its layer)")
    _check_out(args.out, (".png",))
    text = _text(args)
    from gpt2.inspect import attention_patterns, check_layer_head, token_labels
    from gpt2.inspect.plots import plot_all_heads, plot_head, plot_layer, save_png

    model, tok, ids = _load(args, text)
    check_layer_head(model.config, layer=args.layer, head=args.head)
    labels = token_labels(tok, ids)
    if args.layer is None:
        fig = plot_all_heads(attention_patterns(model, ids))
    else:
        patterns = attention_patterns(model, ids, layers=[args.layer])[0]  # (nh, T, T)
        fig = (plot_layer(patterns, labels, layer=args.layer) if args.head is None
               else plot_head(patterns[args.head], labels, layer=args.layer, head=args.head))
    save_png(fig, args.out)
    _wrote(args.out)
    return 0


def _logit_lens(args) -> int:
    _check_out(args.out, (".png",))
    text = _text(args)
    from gpt2.inspect import logit_lens, token_labels

    model, tok, ids = _load(args, text)
    lens = logit_lens(model, ids)
    inputs = token_labels(tok, ids)
    tops = [token_labels(tok, row) for row in lens.top_ids.tolist()]
    if args.out:
        from gpt2.inspect.plots import plot_logit_lens, save_png

        save_png(plot_logit_lens(lens, inputs, tops), args.out)
        _wrote(args.out)
    if args.json:
        _print_json({
            "tokens": [{"id": i, "token": s} for i, s in zip(ids, inputs, strict=True)],
            "layers": lens.names,
            "top_ids": lens.top_ids.tolist(),
            "top_tokens": tops,
            "top_probs": lens.top_probs.tolist(),
            "next_token_probs": lens.target_probs.tolist(),
        })
    elif not args.out:
        width = max(8, *(len(s) for row in tops for s in row[:12]), *map(len, inputs))
        print(" " * 9 + "".join(f"{s[:width]:<{width + 1}}" for s in inputs))
        for name, row in zip(lens.names, tops, strict=True):
            print(f"{name:<9}" + "".join(f"{s[:width]:<{width + 1}}" for s in row))
    return 0


@contextlib.contextmanager
def _heads_progress():
    """A progress(done, total) for ablate_heads that keeps a stderr status line ("ablate:
    37/144 heads, ~40 s left"): each head costs a forward pass of the layers above it."""
    from gpt2.train.progress import StatusLine

    bar = StatusLine("ablate")
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        spent = time.monotonic() - start
        # (the lower layers' heads run more blocks: a plain average overestimates)
        left = f", ~{spent / done * (total - done):.0f} s left" if done < total else ""
        bar.show(f"{done}/{total} heads{left}", force=done == total)

    try:
        yield progress
    finally:
        bar.close()


def _ablate(args) -> int:
    _check_out(args.out, (".png",))
    text = _text(args)
    from gpt2.inspect import ablate_heads

    model, _, ids = _load(args, text, min_tokens=2)
    with _heads_progress() as progress:
        ablation = ablate_heads(model, ids, progress=progress)
    if args.out:
        from gpt2.inspect.plots import plot_ablation, save_png

        save_png(plot_ablation(ablation), args.out)
        _wrote(args.out)
    if args.json:
        _print_json({
            "tokens": len(ids),
            "base_loss": ablation.base_loss,
            "losses": ablation.losses.tolist(),
            "deltas": ablation.deltas.tolist(),
        })
    elif not args.out:
        deltas = ablation.deltas
        print(f"base loss {ablation.base_loss:.4f} nats/token over {len(ids)} tokens; "
              "loss increase with each head zeroed:")
        print("layer " + "".join(f"{'h' + str(h):>8}" for h in range(deltas.size(1))))
        for layer, row in enumerate(deltas.tolist()):
            print(f"{layer:>5} " + "".join(f"{d:>+8.3f}" for d in row))
    return 0


def _report(args) -> int:
    _check_out(args.out, (".html", ".htm"))
    text = _text(args)
    from gpt2.inspect import write_report

    model, tok, _ = _load(args, text)
    with _heads_progress() as progress:
        write_report(model, tok, text, args.out, top=args.top, ablate=not args.no_ablation,
                     progress=progress)
    _wrote(args.out)
    return 0
