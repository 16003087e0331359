"""VGG19's convolutional part as a frozen feature extractor for perceptual losses (Johnson et al.
2016, Gatys et al. 2016).

The weights are the original Caffe/Oxford VGG19 (as re-released for Keras): they expect BGR
pixels in 0-255 minus the ImageNet channel means. This module takes RGB 0-255, like
:class:`~mpistyle.model.transformer_net.TransformerNet`, and converts inside, so callers never
juggle two pixel conventions. Only the layers up to the deepest requested activation are built:
the default (Johnson's block ends) stops after block 4, skipping a quarter of VGG19's work.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# (block, convs, output channels) of VGG19, configuration "E" of Simonyan and Zisserman.
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))
# Conv layers in network order, named as in the Keras weight file (and so in the state dict).
CONV_NAMES: tuple[str, ...] = tuple(f"block{b}_conv{i}" for b, n, _ in _BLOCKS for i in range(1, n + 1))
# Activations a caller can ask for: relu<block>_<conv>, the output of that conv's ReLU.
RELU_NAMES: tuple[str, ...] = tuple(f"relu{b}_{i}" for b, n, _ in _BLOCKS for i in range(1, n + 1))
# Johnson et al.'s choice (VGG16 relu1_2, relu2_2, relu3_3, relu4_3) moved to VGG19: the last ReLU
# of blocks 1-4, which sit at the same depth in the pooling pyramid.
JOHNSON_STYLE_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_4", "relu4_4")
JOHNSON_CONTENT_LAYER = "relu2_2"
# BGR channel means of the ImageNet training set, subtracted by the original Caffe model.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


class VGG19Features(nn.Module):
    """RGB 0-255 ``(N, 3, H, W)`` -> ``{layer: activation}`` for the requested ReLU layers.

    Parameters are frozen (``requires_grad`` False) and the module stays in eval mode; gradients
    still flow to the input, which is what a perceptual loss needs.
    """

    bgr_mean: torch.Tensor  # a buffer (annotated for the type checker: nn.Module's getattr is untyped)

    def __init__(self, layers: Sequence[str] = JOHNSON_STYLE_LAYERS) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in RELU_NAMES]
        if not layers or unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}: choose from {', '.join(RELU_NAMES)}")
        self.layers = tuple(dict.fromkeys(layers))
        depth = max(RELU_NAMES.index(name) for name in self.layers) + 1
        self.conv_names = CONV_NAMES[:depth]
        channels = 3
        for name in self.conv_names:
            block = int(name[5])
            width = next(c for b, _, c in _BLOCKS if b == block)
            setattr(self, name, nn.Conv2d(channels, width, kernel_size=3, padding=1))
            channels = width
        self.register_buffer("bgr_mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        # A fixed loss network: nothing in it behaves differently in training, keep it in eval.
        return super().train(False)

    def forward(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        x = rgb.flip(1) - self.bgr_mean
        wanted = set(self.layers)
        out: dict[str, torch.Tensor] = {}
        for index, name in enumerate(self.conv_names):
            block, conv = int(name[5]), int(name.rsplit("conv", 1)[1])
            if conv == 1 and block > 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = F.relu(getattr(self, name)(x))
            relu = RELU_NAMES[index]
            if relu in wanted:
                out[relu] = x
        return out
