"""DistributedDataParallel plumbing: process group, samplers, reductions.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set) the training
script joins a process group — ``nccl`` on GPU, ``gloo`` on CPU — wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and shards every epoch with
:class:`~torch.utils.data.distributed.DistributedSampler`. Without those variables it runs as a
single process through the same code (world size 1, rank 0).

``--batch-size`` is per process: the global batch is ``world_size × batch_size``. DDP averages
gradients over processes, so one step on N shards of a global batch gives the gradient of the mean
loss over that batch — what ``tests/test_ddp.py`` checks against a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler


@dataclass
class DistributedContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group torchrun describes (``nccl`` on CUDA, ``gloo`` otherwise);
    a no-op returning world size 1 when not launched by torchrun."""
    if not launched_by_torchrun():
        return DistributedContext()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    context = DistributedContext(dist.get_world_size(), dist.get_rank(),
                                 int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(context.local_rank)
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over processes (float64 so counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap_model(model: torch.nn.Module, context: DistributedContext,
               device: torch.device) -> torch.nn.Module:
    """``model`` itself in a single process; else wrapped in DistributedDataParallel, which
    averages gradients over processes."""
    if not context.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def train_sampler(dataset, context: DistributedContext, seed: int) -> DistributedSampler:
    """Shuffled, sharded, padded to a multiple of the world size; call ``set_epoch`` per epoch.
    With world size 1 this is a seeded shuffle of the whole dataset."""
    return DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                              shuffle=True, seed=seed, drop_last=False)


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after the first ``skip`` (a run resumed mid-epoch continues
    where the interrupted one stopped). ``skip`` applies to the next iteration only."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler = sampler
        self.skip = skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator)
        yield from iterator

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + N, …`` in order, without padding: every sample is evaluated exactly
    once over all processes (DistributedSampler would pad with duplicates)."""

    def __init__(self, length: int, context: DistributedContext):
        self.indices = list(range(context.rank, length, context.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
