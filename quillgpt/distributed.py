"""Data-parallel training across processes (`torchrun --nproc_per_node=N quill train ...`).

Every process draws the same global batch and trains on its own rows of it; DistributedDataParallel
averages the gradients. Rank 0 (`main`) alone evaluates, logs and saves. One process is the default;
under torchrun, even one process joins a process group, so `--nproc_per_node=1` runs the same
DDP path (NCCL on a single GPU) as a larger job does.
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
    joined: bool = False
    """Whether this process is in a process group (torchrun started it), so DDP wraps the model."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any process's `flag` is set (so that all stop at the same step)."""
        if not self.joined:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t)
        return t.item() > 0


def init_distributed(device: torch.device) -> Processes:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a process not started by
    torchrun (no WORLD_SIZE and MASTER_ADDR in its environment) joins none."""
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not launched:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), joined=True)
