"""The one interface every model must meet to be scored by the pipeline.

A *frame model* is any ``torch.nn.Module`` whose ``forward`` takes a float tensor of RGB frames
``(N, 3, H, W)`` with values in ``[0, 1]`` and returns a tensor of the same shape and range. The
pipeline batches frames, moves them to the rank's device, and calls the module under
``torch.inference_mode()``. Models built for another value range are wrapped in
:class:`ValueRange`.
"""
from __future__ import annotations

import torch
from torch import nn


class ValueRange(nn.Module):
    """Adapts a model that expects and returns pixel values in ``[0, scale]`` to the [0, 1] contract."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.scale) / self.scale
