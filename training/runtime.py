"""Process set-up shared by every command: seeds, and the data-parallel process group.

A run is reproducible when Python's, numpy's and torch's generators start from the config's
seed. Data-parallel training runs under `torchrun`, which sets WORLD_SIZE; the process group uses
nccl on GPU and gloo on CPU.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process, joining the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
