"""Training and fine-tuning: token files, the loop, checkpoints, data parallelism.

    data.py         `gpt2 prepare`: text files -> train.bin / val.bin / meta.json; batches
    trainer.py      the training loop (TrainConfig, train)
    checkpoint.py   crash-safe checkpoints in the Hugging Face layout + training state
    distributed.py  DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPUs)
    plot.py         loss.png
    progress.py     the stderr status line
    _tidy.py        a failed prepare or train takes away what it wrote into --out

    >>> from gpt2.train import TrainConfig, prepare, train
    >>> prepare(["book.txt"], out="data/book")                      # doctest: +SKIP
    >>> train(TrainConfig(data="data/book", out="runs/book"))       # doctest: +SKIP
"""

from gpt2.train.data import open_tokens, prepare
from gpt2.train.trainer import TrainConfig, TrainSummary, train

__all__ = ["TrainConfig", "TrainSummary", "open_tokens", "prepare", "train"]
