"""One process or many (torchrun / srun): the rank, and collectives that are no-ops alone.

The trainer calls these unconditionally, so its loop has no `if distributed` branches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (and return it)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_from_main(self, value: float, device: torch.device) -> float:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], device=device, dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launcher_world_size() -> int:
    """The number of processes the launcher (torchrun or srun) started, before any set-up."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1)


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a bare `srun` (one task per GPU) sets SLURM_*."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        if "MASTER_ADDR" not in os.environ:
            raise UserError("srun with several tasks: export MASTER_ADDR (and MASTER_PORT) first")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
