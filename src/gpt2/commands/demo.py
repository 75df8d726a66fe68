"""`gpt2 demo`: the offline quick start. Prepare text, train a small GPT-2, generate.

The text is the one that ships with every Python: the help topics of the
standard library's `pydoc_data.topics` (about 0.25 MB of English prose about
Python). Nothing is downloaded. On a 2-core CPU the default run takes a few
minutes and takes the loss from ln(50257) = 10.8 (a uniform guess over the
vocabulary) to about 4-5 nats per token on the training text and 5.3-5.5 on the
held-out last 5%.
"""

from __future__ import annotations

import argparse
import shlex

NAME = "demo"
MARKER = ".gpt2-demo"  # in --out: the demo made this folder and may replace what it holds
HELP = "offline quick start: train a small GPT-2 on Python's own help text, then generate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gpt2-demo", metavar="DIR",
                   help="folder for the text, the token files and the run (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.add_argument("--prompt", default="The", help="start of the sample (default: %(default)r)")
    p.add_argument("--seed", type=int, default=1337, help="default: %(default)s")


def write_topics(path) -> int:
    """Write the prose of the stdlib's pydoc topics as one text file; return its size in bytes.

    Indented lines (code examples, grammar rules, tables), the rows and borders of
    unindented tables and heading underlines are left out: a small model trained for
    minutes learns English-looking text from the prose, while the code would fill its
    samples with underscores and brackets (and the tables, repeating themselves, made
    the validation split -- the last 5%, a quarter of it table rows -- easy to predict).
    """
    import re
    from pydoc_data.topics import topics

    from gpt2._io import atomic_write_text

    table = re.compile(r"^(\+[-=+]+\+|\|.*\|)\s*$")  # a border, or a row of cells

    def prose(topic: str) -> str:
        lines = [line for line in topic.splitlines()
                 if not line[:1].isspace() and len(set(line.strip())) != 1
                 and not table.match(line)]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

    text = "\n\n".join(prose(topics[k]) for k in sorted(topics)) + "\n"
    atomic_write_text(path, text)
    return len(text.encode("utf-8"))


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from gpt2.commands._common import resolve_device
    from gpt2.errors import GPT2Error
    from gpt2.model import GPT2
    from gpt2.train.data import prepare
    from gpt2.train.trainer import TrainConfig, train, validated

    if args.steps < 1:
        raise GPT2Error(f"--steps must be at least 1, got {args.steps}")
    out = Path(args.out)
    run_dir = out / "run"
    cfg = TrainConfig(
        data=str(out / "data"), out=str(run_dir), n_layer=4, n_head=4, n_embd=128,
        block_size=128, batch_size=8, max_steps=args.steps, lr=3e-3, min_lr=3e-4,
        warmup_steps=min(50, args.steps // 10), weight_decay=0.1,
        eval_interval=max(1, args.steps // 6), eval_steps=8, save_interval=0,
        device=args.device, seed=args.seed,
    )
    validated(cfg)  # a bad --seed (or --device, next) fails before any text is prepared
    if args.device != "auto":
        resolve_device(args.device)
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out}: exists and is not a folder; choose a new folder")
    # The demo replaces its text, data and run each time: only in a folder it made
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise GPT2Error(f"--out {out}: holds files the demo did not make (the demo replaces "
                        "its run/ and data/ there); choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `gpt2 demo`, which may replace what is here\n",
                                  encoding="utf-8")
    except OSError as e:
        raise GPT2Error(f"--out {out}: cannot write there ({e.strerror})") from None
    text = out / "pydoc_topics.txt"
    size = write_topics(text)
    print(f"1/3 text: {text} ({size / 1e6:.2f} MB of Python's help topics)")
    meta = prepare([text], out=out / "data", val_fraction=0.05)
    print(f"2/3 tokens: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val")
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts over each time
    print(f"3/3 training a 4-layer, 128-wide GPT-2 for {args.steps} steps into {run_dir} "
          "(ln(50257) = 10.8 is the loss of a uniform guess)")
    summary = train(cfg)
    model = GPT2.from_pretrained(run_dir / "best" if (run_dir / "best").is_dir() else run_dir)
    tok = model_tokenizer(run_dir)
    idx = torch.tensor([tok.encode(args.prompt) or [tok.eot_token]])  # "": a new document
    ids = model.generate(idx, max_new_tokens=80, temperature=0.8, top_k=40, seed=args.seed)
    print(f"\nval loss {summary.best_val_loss:.3f} (best); a sample:\n")
    print(tok.decode(ids[0].tolist()))
    print(f"\nthe model is in {run_dir}: gpt2 generate --model {shlex.quote(str(run_dir))} "
          f"{shlex.quote(args.prompt)}")
    return 0


def model_tokenizer(folder):
    from gpt2.commands._common import load_tokenizer_for

    return load_tokenizer_for(folder)
