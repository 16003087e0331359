"""The perceptual loss of Johnson et al. (2016): content as VGG feature distance, style as the
distance of Gram matrices (Gatys et al.), plus optional total variation. Tensors in, tensors out.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.vgg import VGG19Features


def gram(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, C)``, normalised by C*H*W so the crop size does not scale it."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels: penalises speckle."""
    return (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean() + (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()


class PerceptualLoss(nn.Module):
    """``(styled, content)`` RGB 0-255 batches -> weighted losses: content, style, tv, total.

    Each term is a mean over the batch, so averaging the gradients of equal batches on several
    ranks gives exactly the gradient of the whole batch.
    """

    def __init__(
        self,
        vgg: VGG19Features,
        style: torch.Tensor,
        content_layer: str,
        style_layers: Sequence[str],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ) -> None:
        super().__init__()
        missing = [name for name in (content_layer, *style_layers) if name not in vgg.layers]
        if missing:
            raise ValueError(f"the VGG module does not return {missing}")
        self.vgg = vgg
        self.content_layer = content_layer
        self.style_layers = tuple(style_layers)
        self.weights = (content_weight, style_weight, tv_weight)
        with torch.no_grad():
            features = vgg(style)
        # The style's Gram matrices are fixed targets: computed once, moved with the module.
        for index, name in enumerate(self.style_layers):
            self.register_buffer(f"style_gram{index}", gram(features[name]), persistent=False)

    def forward(self, styled: torch.Tensor, content: torch.Tensor) -> dict[str, torch.Tensor]:
        content_weight, style_weight, tv_weight = self.weights
        with torch.no_grad():
            target = self.vgg(content)[self.content_layer]
        features = self.vgg(styled)
        content_loss = content_weight * F.mse_loss(features[self.content_layer], target)
        style_loss = styled.new_zeros(())
        for index, name in enumerate(self.style_layers):
            own = gram(features[name])
            style_loss = style_loss + F.mse_loss(own, getattr(self, f"style_gram{index}").expand_as(own))
        style_loss = style_weight * style_loss
        tv_loss = tv_weight * total_variation(styled) if tv_weight else styled.new_zeros(())
        return {"content": content_loss, "style": style_loss, "tv": tv_loss, "total": content_loss + style_loss + tv_loss}
