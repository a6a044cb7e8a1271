"""Several processes with torchrun: one per GPU (NCCL), or several on a CPU (gloo).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and
every function here is a no-op. Only collectives the loop needs at its log and save points
live here; the per-step gradient all-reduce is DistributedDataParallel's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (NCCL when this run uses CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # a rank that dies makes torchrun stop the others; the timeout bounds any wait on a lost peer, and
        # covers the longest legitimate one: the other ranks waiting while rank 0 scans a large, uncached data set
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, local, world)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (others pass None)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (in place)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= d.world_size
    return t


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (a stop request seen by some ranks only)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
