"""`gpt2 train`: train GPT-2 from scratch or fine-tune it; torchrun for several processes.

    gpt2 prepare book.txt --out data/book
    gpt2 train --data data/book --out runs/book                      # small model, from scratch
    gpt2 train --data data/book --out runs/ft --init 124M --lr 3e-5  # fine-tune
    torchrun --nproc_per_node 8 -m gpt2 train --data ... --out ...   # 8 GPUs
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train GPT-2 from scratch or fine-tune it (torchrun -m gpt2 train for several GPUs)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gpt2.train.trainer import TrainConfig

    d = TrainConfig(data="", out="")
    p.add_argument("--data", required=True, metavar="DIR", help="a folder made by `gpt2 prepare`")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoints, log.jsonl, loss.png; GPT2.from_pretrained(DIR) loads it")
    p.add_argument("--init", default=d.init, metavar="FROM",
                   help="scratch (default), a size (124M, gpt2-medium, ...) or a checkpoint "
                   "folder to fine-tune")
    g = p.add_argument_group("model (from scratch only)")
    g.add_argument("--n-layer", type=int, default=d.n_layer, help="default: %(default)s")
    g.add_argument("--n-head", type=int, default=d.n_head, help="default: %(default)s")
    g.add_argument("--n-embd", type=int, default=d.n_embd, help="default: %(default)s")
    g.add_argument("--dropout", type=float, default=d.dropout, help="default: %(default)s")
    g = p.add_argument_group("optimisation")
    g.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per window (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="windows per micro-batch per process (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per step (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="default: %(default)s")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="default: %(default)s")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW decay of the weight matrices (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="max gradient norm, 0 for none (default: %(default)s)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d.dtype,
                   help="autocast precision (default: %(default)s; bf16 on recent GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default=d.device,
                   help="auto (default: cuda when there is one), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    g = p.add_argument_group("evaluation, samples, checkpoints")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between val losses, 0: at the end only (default: %(default)s)")
    g.add_argument("--eval-steps", type=int, default=d.eval_steps,
                   help="batches per val loss (default: %(default)s)")
    g.add_argument("--save-interval", type=int, default=d.save_interval,
                   help="steps between checkpoints, 0: at the end only (default: %(default)s)")
    g.add_argument("--sample-interval", type=int, default=d.sample_interval,
                   help="steps between generated samples, 0: none (default: %(default)s)")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                   help="length of a sample (default: %(default)s)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP with a checkpoint, keeping the schedule of "
                   "--max-steps; continue later with --resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from gpt2.train.trainer import TrainConfig, train

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
    summary = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {summary.val_loss:.4f}" if summary.val_loss is not None else ""
        loss = f", loss {summary.last_loss:.4f}" if summary.last_loss is not None else ""
        print(f"{summary.out}: step {summary.step}{loss}{val}; "
              f"generate with `gpt2 generate --model {summary.out}`")
    return 0
