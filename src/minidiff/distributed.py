"""Data-parallel training under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

A process started by ``torchrun --nproc_per_node=N`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
in its environment; without them everything here is a no-op and training is single-process.
Each rank takes its own shard of every global batch (and of that batch's noise and timesteps),
so N ranks compute the same update as one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MinidiffError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (``n`` divisible by the world size)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that torchrun describes -> ``(world, this rank's device)``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise MinidiffError(f"--batch-size {batch_size} is the global batch and must be "
                            f"divisible by the {world.size} processes; use a multiple of "
                            f"{world.size}")


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through (DDP when there are several ranks)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Average a scalar over ranks (every rank gets the result), e.g. the loss to log."""
    if world.size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
