"""Data-parallel training across processes, as started by `torchrun`.

`torchrun --nproc_per_node N -m gpt2 train ...` starts N copies of the trainer
and gives each one RANK, LOCAL_RANK and WORLD_SIZE (plus MASTER_ADDR/PORT, or a
rendezvous endpoint for several machines). Each copy holds the whole model
(DistributedDataParallel), reads its own micro-batches and averages gradients
with the others after the last micro-batch of a step. NCCL carries the
gradients between GPUs, gloo between CPU processes.

Without those variables the trainer runs as a single process, world size 1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2.errors import GPT2Error


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, samples and checkpoints."""
        return self.rank == 0


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process.

    On CUDA each process takes the GPU numbered by its LOCAL_RANK (one per process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GPT2Error(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                "GPUs; start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise GPT2Error(f"distributed training runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The average of a tensor over every process (itself when single-process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around the model when several processes train it."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model: torch.nn.Module, *, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a step:
    gradients accumulate locally and are averaged once, which is the same sum."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
