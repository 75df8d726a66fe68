"""Training and fine-tuning: token files, the loop, checkpoints, data parallelism.

    data.py         `gpt2 prepare`: text files -> train.bin / val.bin / meta.json; batches
    config.py       TrainConfig: a run's settings
    trainer.py      the training loop (train)
    checkpoint.py   crash-safe checkpoints in the Hugging Face layout + training state
    distributed.py  DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPUs)
    plot.py         loss.png
    progress.py     the stderr status line
    _tidy.py        a failed prepare or train takes away what it wrote into --out

    >>> from gpt2.train import TrainConfig, prepare, train
    >>> prepare(["book.txt"], out="data/book")                      # doctest: +SKIP
    >>> train(TrainConfig(data="data/book", out="runs/book"))       # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpt2._lazy import lazy_exports
from gpt2.train.config import TrainConfig

if TYPE_CHECKING:
    from gpt2.train.data import open_tokens, prepare
    from gpt2.train.trainer import TrainSummary, train

__all__ = ["TrainConfig", "TrainSummary", "open_tokens", "prepare", "train"]

# imported on first use: they need PyTorch (see gpt2/__init__.py)
__getattr__, __dir__ = lazy_exports(globals(), {
    "open_tokens": "gpt2.train.data", "prepare": "gpt2.train.data",
    "TrainSummary": "gpt2.train.trainer", "train": "gpt2.train.trainer"})
