"""The settings of a training run: `TrainConfig`, one field per `gpt2 train` flag.

Apart from the trainer so that the command line reads the defaults for its help
without importing PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PER_INVOCATION", "RESUMABLE_CHANGES", "TrainConfig"]

# On resume (see _merge_resumed): settings of one invocation rather than of the run, taken
# as given; settings of the run that a resumed run may change when they are given (else
# the run's own); every other setting is the run's own, because changing it would make
# the resumed run a different run (--data may name the same data in another place).
PER_INVOCATION = ("out", "resume", "stop_at", "device", "compile", "progress")
RESUMABLE_CHANGES = ("max_steps", "eval_interval", "eval_steps", "save_interval",
                     "sample_interval", "sample_tokens")


@dataclass
class TrainConfig:
    """The settings of a run (the `gpt2 train` flags, one to one)."""

    data: str | None  # a folder made by `gpt2 prepare`; None on resume: the run's own
    out: str
    init: str = "scratch"  # "scratch", a size name (124M, gpt2-medium, ...) or a checkpoint path
    n_layer: int = 6  # from scratch only: the network's shape
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256  # tokens per training window (n_ctx of a model built from scratch)
    batch_size: int = 8  # windows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float | None = None  # the cosine schedule's floor, 0..lr; default lr / 10
    warmup_steps: int = 100  # more than max_steps: the lr rises all run, never reaching lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 turns clipping off
    dropout: float = 0.0
    dtype: str = "fp32"  # autocast precision: fp32, bf16 or fp16 (fp16 uses a GradScaler)
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    eval_interval: int = 100  # steps between validation runs (0: only at the end)
    eval_steps: int = 20  # micro-batches per validation run
    save_interval: int = 500  # steps between checkpoints (0: only at the end)
    sample_interval: int = 0  # steps between generated samples (0: never)
    sample_tokens: int = 64
    stop_at: int | None = None  # stop (with a checkpoint) after this step, >= 1; resume goes on
    resume: bool = False
    progress: bool = True
