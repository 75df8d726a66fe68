"""`gpt2 train`: train GPT-2 from scratch or fine-tune it; torchrun for several processes.

    gpt2 prepare book.txt --out data/book
    gpt2 train --data data/book --out runs/book                      # small model, from scratch
    gpt2 train --data data/book --out runs/ft --init 124M --lr 3e-5  # fine-tune
    gpt2 train --out runs/book --resume      # go on: the run keeps its data and settings
    torchrun --nproc_per_node 8 -m gpt2 train --data ... --out ...   # 8 GPUs
"""

from __future__ import annotations

import argparse
import shlex

NAME = "train"
HELP = "train GPT-2 from scratch or fine-tune it (torchrun -m gpt2 train for several GPUs)"


class _Chosen(argparse.Action):
    """Store the value and note the flag as given: on --resume, a given setting that
    differs from the run's own is an error instead of being silently dropped."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.chosen = {*namespace.chosen, self.dest}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gpt2.train.config import TrainConfig  # not the trainer: help without PyTorch

    d = TrainConfig(data="", out="")
    p.set_defaults(chosen=frozenset())
    p.add_argument("--data", metavar="DIR", action=_Chosen,
                   help="a folder made by `gpt2 prepare` (required; with --resume the run's "
                   "own by default, or the same data moved elsewhere)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoints, log.jsonl, loss.png; GPT2.from_pretrained(DIR) loads it")
    p.add_argument("--init", default=d.init, metavar="FROM", action=_Chosen,
                   help="scratch (default), a size (124M, gpt2-medium, ...) or a checkpoint "
                   "folder to fine-tune")
    g = p.add_argument_group("model (from scratch only)")
    g.add_argument("--n-layer", type=int, default=d.n_layer, action=_Chosen,
                   help="default: %(default)s")
    g.add_argument("--n-head", type=int, default=d.n_head, action=_Chosen,
                   help="default: %(default)s")
    g.add_argument("--n-embd", type=int, default=d.n_embd, action=_Chosen,
                   help="a multiple of --n-head (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout, action=_Chosen,
                   help="default: %(default)s")
    g = p.add_argument_group("optimisation")
    g.add_argument("--block-size", type=int, default=d.block_size, action=_Chosen,
                   help="tokens per window (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, action=_Chosen,
                   help="windows per micro-batch per process (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, action=_Chosen,
                   help="micro-batches per step (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, action=_Chosen,
                   help="steps to train; the cosine schedule ends there (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, action=_Chosen,
                   help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=None, action=_Chosen,
                   help="cosine floor, from 0 to --lr (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, action=_Chosen,
                   help="steps of linear warmup to --lr, then cosine decay to --min-lr at "
                   "--max-steps; more than --max-steps is allowed: the lr then rises all run "
                   "and never reaches --lr (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, action=_Chosen,
                   help="AdamW decay of the weight matrices (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, action=_Chosen,
                   help="max gradient norm, 0 for none (default: %(default)s)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d.dtype, action=_Chosen,
                   help="autocast precision (default: %(default)s on any device; choose bf16 "
                   "on GPUs that have it, for speed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default=d.device,
                   help="auto (default: cuda when there is one), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=int, default=d.seed, action=_Chosen,
                   help="0 to 2**64 - 1 (default: %(default)s)")
    g = p.add_argument_group("evaluation, samples, checkpoints")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, action=_Chosen,
                   help="steps between val losses, 0: at the end only (default: %(default)s)")
    g.add_argument("--eval-steps", type=int, default=d.eval_steps, action=_Chosen,
                   help="batches per val loss (default: %(default)s)")
    g.add_argument("--save-interval", type=int, default=d.save_interval, action=_Chosen,
                   help="steps between checkpoints, 0: at the end only (default: %(default)s)")
    g.add_argument("--sample-interval", type=int, default=d.sample_interval, action=_Chosen,
                   help="steps between generated samples, 0: none (default: %(default)s)")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens, action=_Chosen,
                   help="length of a sample (default: %(default)s)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after step STEP (1 or more) with a checkpoint, keeping the "
                   "schedule of --max-steps; continue later with --resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint with the run's "
                   "settings: --max-steps, --stop-at, the intervals, --eval-steps, "
                   "--sample-tokens, --device, --compile and --data (the same data, moved) "
                   "may be given anew, other flags only with the run's own values")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from gpt2.errors import GPT2Error
    from gpt2.train.trainer import TrainConfig, train

    shape = sorted(f"--{n.replace('_', '-')}" for n in ("n_layer", "n_head", "n_embd")
                   if n in args.chosen)
    if shape and args.init != "scratch":  # (they were ignored)
        raise GPT2Error(f"{', '.join(shape)}: the shape of a model trained from scratch; "
                        f"--init {args.init} brings its own, so drop the flag")

    cfg = TrainConfig(
        data=args.data, out=args.out, init=args.init, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, dropout=args.dropout,
        dtype=args.dtype, compile=args.compile, device=args.device, seed=args.seed,
        eval_interval=args.eval_interval, eval_steps=args.eval_steps,
        save_interval=args.save_interval, sample_interval=args.sample_interval,
        sample_tokens=args.sample_tokens, stop_at=args.stop_at, resume=args.resume,
        progress=not args.quiet,
    )
    summary = train(cfg, explicit=args.chosen)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {summary.val_loss:.4f}" if summary.val_loss is not None else ""
        loss = f", loss {summary.last_loss:.4f}" if summary.last_loss is not None else ""
        print(f"{summary.out}: step {summary.step}{loss}{val}; "
              f"generate with `gpt2 generate --model {shlex.quote(str(summary.out))}`")
    return 0
