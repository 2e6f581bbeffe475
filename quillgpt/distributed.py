"""Data-parallel training across processes (`torchrun --nproc_per_node=N quill train ...`).

Every process draws the same global batch and trains on its own rows of it; DistributedDataParallel
averages the gradients. Rank 0 (`main`) alone evaluates, logs and saves. One process is the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any process's `flag` is set (so that all stop at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t)
        return t.item() > 0


def init_distributed(device: torch.device) -> Processes:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); one process: no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
