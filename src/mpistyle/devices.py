"""Which device a rank computes on, and how many CPU threads it takes: shared by scoring and
training. No MPI (the local rank is passed in), no files."""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(requested: object) -> None:
    """Refuse a ``device=`` setting that names no device (before anything is loaded)."""
    if not _DEVICE.match(str(requested)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{requested}'")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` and ``cuda`` give each rank on a node its own GPU: ``cuda:<local rank mod GPUs>``."""
    import torch  # here, not at the top: the CLI checks its config before torch is loaded

    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if requested == "cuda":
            raise ConfigError("device=cuda but this node has no usable CUDA GPU (use device=auto or cpu)")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested} but this node has no usable CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={requested} but this node has {torch.cuda.device_count()} GPU(s)")
    return device


def set_threads(threads: int | None, ranks_on_node: int) -> int:
    """Torch CPU threads for this rank: the CPUs it may run on (mpirun binding respected),
    shared among the node's ranks, unless given."""
    import torch

    if threads is None:
        cpus = len(os.sched_getaffinity(0))
        # Ranks bound to their own cores already see only those; unbound ranks share the node.
        threads = max(1, cpus // ranks_on_node) if cpus >= ranks_on_node else 1
    torch.set_num_threads(threads)
    return threads
