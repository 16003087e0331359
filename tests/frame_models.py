"""Frame models that tests plug in through `model._target_`, as a user would plug in their own."""
from __future__ import annotations

import os

import torch
from torch import nn

from mpistyle.errors import ModelError


class Invert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x


def invert() -> nn.Module:
    return Invert()


class HalfWidth(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::2]


def half_width() -> nn.Module:
    return HalfWidth()


def _rank() -> int:
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


class FailAfter(nn.Module):
    """Raises on its ``batches``-th call: a rank that breaks in the middle of scoring."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.left = batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("simulated failure inside the model")
        return x


def fail_on_rank(rank: int, after_batches: int = 1) -> nn.Module:
    return FailAfter(after_batches) if _rank() == rank else Invert()


def refuse_on_rank(rank: int) -> nn.Module:
    """Fails while loading, on one rank only (a node whose checkpoint copy is damaged)."""
    if _rank() == rank:
        raise ModelError("simulated damaged checkpoint on this node")
    return Invert()


def dump_env(path: str) -> nn.Module:
    """Writes the job's environment to ``path`` (to check what a job is handed), then inverts."""
    import json

    with open(path, "w") as handle:
        json.dump(dict(os.environ), handle)
    return Invert()


class Slow(nn.Module):
    """Inverts, taking ``seconds`` per batch: a job that runs long enough to be interrupted."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        return 1.0 - x


def slow(seconds: float) -> nn.Module:
    return Slow(seconds)


def slow_on_rank(rank: int, seconds: float) -> nn.Module:
    """Inverts; on ``rank`` it takes ``seconds`` per batch: a slower GPU, or a busy node."""
    return Slow(seconds) if _rank() == rank else Invert()


def hang() -> nn.Module:
    """Never returns from its first batch: a hung job (a wedged GPU, a deadlock)."""
    return Slow(10**6)


def staging_full() -> nn.Module:
    """Fails with the staging area's error (exit 6): a failure that is not the input's fault."""
    from mpistyle.errors import StagingError

    raise StagingError("simulated full staging area")
