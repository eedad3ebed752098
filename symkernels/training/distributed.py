"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, NCCL on GPU).

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (``torchrun`` also sets ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). Every process draws the same epoch order and
augmentation parameters for the whole global batch and trains on its contiguous shard of it; DDP averages the
gradients, which equals the single-process gradient of the global-batch mean when the shards have equal size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this module created the process group and will destroy it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from error


def init_from_env(device: torch.device) -> DistEnv:
    """Join the process group described by the ``torchrun`` environment; a single process needs none."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if world_size == 1:
        return DistEnv()
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, initialized_here=True)


def shutdown(env: DistEnv) -> None:
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch_size: int, env: DistEnv) -> slice:
    """This process's contiguous part of a global batch (every part has the same size)."""
    if batch_size % env.world_size:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of processes ({env.world_size}) "
            "so that every process gets an equal shard of each global batch"
        )
    part = batch_size // env.world_size
    return slice(env.rank * part, (env.rank + 1) * part)


def even_range(n: int, env: DistEnv) -> slice:
    """This process's part of ``n`` items cut into ``world_size`` contiguous ranges (sizes differ by ≤ 1)."""
    start = n * env.rank // env.world_size
    stop = n * (env.rank + 1) // env.world_size
    return slice(start, stop)


def sum_across(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, so counts stay exact)."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_across(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (so that all stop at the same step)."""
    if not env.distributed:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """``obj`` of every process, in rank order (on every process)."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
