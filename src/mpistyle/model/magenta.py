"""What the two Magenta networks share, :class:`~mpistyle.model.multistyle.MultiStyleNet` and
:class:`~mpistyle.model.arbitrary.ArbitraryStyleNet`: a contract -> residual -> expand stack
whose every layer takes the style as a second input, run on a frame padded to a size the stack
can give back unchanged. They differ in their layers and in where the style comes from.

Pure tensors in, tensors out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Two stride-2 convolutions on the way in, two x2 upsamplings on the way out: sides must be
# multiples of 4 for the output to come back at the input's size.
SIDE_MULTIPLE = 4
# The 3x3 reflect pads at quarter resolution need at least 2 pixels there.
MIN_SIDE = 8


def pad_to_fit(x: torch.Tensor) -> torch.Tensor:
    """``x`` padded at the bottom and right up to sides that are multiples of 4 (at least 8)."""
    height, width = x.shape[-2:]
    pad_h = max(MIN_SIDE, height + -height % SIDE_MULTIPLE) - height
    pad_w = max(MIN_SIDE, width + -width % SIDE_MULTIPLE) - width
    if pad_h or pad_w:
        # Reflection needs the pad to be smaller than the side; tiny frames replicate instead.
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x


def stylise(
    x: torch.Tensor, style: torch.Tensor, contract: nn.ModuleList, residual: nn.ModuleList, expand: nn.ModuleList
) -> torch.Tensor:
    """RGB in [0, 1] (N, 3, H, W) through the stack, each layer called as ``layer(x, style)``;
    the result is cropped back to H x W, so padding never stretches a pixel."""
    height, width = x.shape[-2:]
    x = pad_to_fit(x)
    for layer in contract:
        x = F.relu(layer(x, style))
    for block in residual:
        x = block(x, style)
    for layer in expand[:-1]:
        x = F.relu(layer(x, style))
    x = torch.sigmoid(expand[-1](x, style))
    return x[..., :height, :width]
