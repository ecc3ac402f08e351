"""Who am I in the job: rank, local rank and world size from the launcher's environment.

torchrun (and Ray Train, which sets the same variables) give RANK/LOCAL_RANK/WORLD_SIZE and
MASTER_ADDR/PORT; SLURM's srun gives SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_rank() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else srun's SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when the launcher started several processes; else a single one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                        int(env["SLURM_NTASKS"]))
    else:
        return DistInfo()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return info


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank: one tiny all-reduce (a host sync),
    so that all ranks take the same branch (stop, save) and none waits in a collective alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks (a copy; one all-reduce, a host sync where read)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t.clone()
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_from_main(obj: object) -> object:
    """Rank 0's `obj` on every rank (a picklable object); `obj` itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 only (its result there, None elsewhere). A UserError it raises is raised
    on every rank, so no rank goes on into a collective that rank 0 will never join."""
    result, problem = None, None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            problem = e
    message = broadcast_from_main(None if problem is None else str(problem))
    if message is not None:
        raise problem if problem is not None else UserError(message)
    return result
