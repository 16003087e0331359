"""Training images: the content set (a folder of images or a video's frames), the random crops
each step trains on, the style image and the fixed sample image.

The crops of a step are a pure function of (seed, step): every rank draws the same global batch
and keeps its own slice of it. So a resumed run sees the crops an uninterrupted one would, and
N ranks at batch b train on exactly what one rank at batch N*b would.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import av
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Crops cover this share of the image's shorter side or more: varied scales, never a sliver.
MIN_CROP_SCALE = 0.5


class ContentSet(Protocol):
    def __len__(self) -> int: ...

    def image(self, index: int) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)``."""
        ...


def read_image(path: Path) -> np.ndarray:
    """The first picture of an image file (or video) FFmpeg reads, as RGB uint8 ``(H, W, 3)``."""
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError, IndexError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None
    raise InputError(f"cannot read image {path}: it holds no picture")


class ImageFolder:
    """Every jpg/png under a folder, recursively, in a fixed order; read when a crop needs it."""

    def __init__(self, root: Path) -> None:
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise InputError(f"no jpg or png images under {root}")

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


class VideoFrames:
    """Every ``every``-th frame of a video, decoded once and kept in memory, shrunk so the
    shorter side is at most ``max_side`` (twice the crop size: crops still get detail, and an
    hour of 4K video stays a few hundred MB)."""

    def __init__(self, path: Path, every: int, max_side: int) -> None:
        self.frames: list[np.ndarray] = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"content {path} is neither a folder nor a video")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of the start-up
                for number, frame in enumerate(container.decode(stream)):
                    if number % every == 0:
                        self.frames.append(_shrink(frame, max_side))
        except (av.FFmpegError, OSError) as err:
            raise InputError(f"cannot read content video {path}: {err}") from None
        if not self.frames:
            raise InputError(f"content video {path} has no frames")
        log.info("content: %d frames kept from %s (every %d-th)", len(self.frames), path, every)

    def __len__(self) -> int:
        return len(self.frames)

    def image(self, index: int) -> np.ndarray:
        return self.frames[index]


def _shrink(frame: av.VideoFrame, max_side: int) -> np.ndarray:
    short = min(frame.width, frame.height)
    if short <= max_side:
        return frame.to_ndarray(format="rgb24")
    width, height = round(frame.width * max_side / short), round(frame.height * max_side / short)
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()


def open_content(path: Path, image_size: int, video_every: int) -> ContentSet:
    if path.is_dir():
        return ImageFolder(path)
    if not path.is_file():
        raise InputError(f"content not found: {path}")
    return VideoFrames(path, video_every, 2 * image_size)


@dataclass(frozen=True)
class Crop:
    """A square crop of image ``index``: side ``scale`` x the shorter side, its top-left corner
    at fractions ``fx``, ``fy`` of the room left, mirrored when ``flip``."""

    index: int
    scale: float
    fx: float
    fy: float
    flip: bool


def crop_plan(seed: int, step: int, count: int, images: int) -> list[Crop]:
    """The global batch of ``step``: the same on every rank, whatever the rank count. Pure."""
    rng = np.random.default_rng([seed, step])
    return [
        Crop(int(rng.integers(images)), float(rng.uniform(MIN_CROP_SCALE, 1.0)), float(rng.random()),
             float(rng.random()), bool(rng.random() < 0.5))
        for _ in range(count)
    ]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` -> float ``(1, 3, H, W)`` in 0-255, the TransformerNet convention."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()


def cut(image: np.ndarray, crop: Crop, size: int) -> torch.Tensor:
    height, width = image.shape[:2]
    side = max(1, round(min(height, width) * crop.scale))
    top, left = round((height - side) * crop.fy), round((width - side) * crop.fx)
    patch = to_tensor(image[top:top + side, left:left + side])
    if crop.flip:
        patch = patch.flip(3)
    return resize(patch, size, size)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if image.shape[-2:] == (height, width):
        return image
    # Antialiased when shrinking, so crops of big photos are not aliased noise.
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def batch(content: ContentSet, crops: Sequence[Crop], size: int) -> torch.Tensor:
    return torch.cat([cut(content.image(crop.index), crop, size) for crop in crops])


def resize_short_side(image: torch.Tensor, short: int, multiple: int = 1) -> torch.Tensor:
    """Scale so the shorter side is ``short``; sides rounded to ``multiple`` (TransformerNet: 4)."""
    height, width = image.shape[-2:]
    factor = short / min(height, width)
    new_h = max(multiple, round(height * factor / multiple) * multiple)
    new_w = max(multiple, round(width * factor / multiple) * multiple)
    return resize(image, new_h, new_w)


# VGG19 halves the picture three times before relu4_4: smaller style images have no features there.
MIN_STYLE_SIDE = 16


def style_tensor(path: Path, style_size: int | None) -> torch.Tensor:
    if path.is_dir():
        raise InputError(f"style_image is a folder, not a picture: {path}")
    if not path.is_file():
        raise InputError(f"style image not found: {path}")
    image = to_tensor(read_image(path))
    image = resize_short_side(image, style_size) if style_size else image
    height, width = image.shape[-2:]
    if min(height, width) < MIN_STYLE_SIDE:
        raise InputError(
            f"style image {path} is {width}x{height}: the loss needs at least {MIN_STYLE_SIDE} pixels a side "
            "(use a larger picture, or style_size=256 to scale it up)"
        )
    return image


def sample_tensor(content: ContentSet, path: Path | None, image_size: int) -> torch.Tensor:
    """The picture every sample restyles: the given file or the first content image, at the
    training scale (shorter side ``image_size``)."""
    if path is not None and not path.is_file():
        raise InputError(f"sample image not found: {path}")
    image = read_image(path) if path is not None else content.image(0)
    return resize_short_side(to_tensor(image), image_size, multiple=4)
