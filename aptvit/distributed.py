"""torchrun / DDP plumbing shared by fine-tuning and evaluation."""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import List

import torch

from .runtime import resolve_device


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job if there is one (nccl on CUDA, gloo on CPU).

    Args:
        device: "auto" (CUDA when available, the CPU otherwise), "cpu" or "cuda"; see ``aptvit.runtime``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left at exit, before the interpreter tears down: a process group still alive then can abort the process
        # ("terminate called without an active exception") after a run that succeeded
        atexit.register(leave_distributed)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, device)


def leave_distributed() -> None:
    """Destroy this process's torchrun process group, if it has one (``setup_distributed`` calls it at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process is rank 0 of its torchrun job (True without one, or before it is joined)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def main_process_only(record: logging.LogRecord) -> bool:
    """A logging filter that drops the records of every rank but 0, so that a torchrun job says things once."""
    return is_main_process()


def all_reduce_sum(values: List[float], dist: Dist) -> List[float]:
    """Sum a few numbers over all ranks."""
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, dist: Dist) -> list:
    """Every rank's ``obj`` (a list of one item without torchrun)."""
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out
