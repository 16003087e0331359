"""The plan: what the root decides before any frame is scored, and sends every rank.

It probes the input, checks every place the job will write and the encoder settings, and cuts
the video into segments (from the input alone, whatever the rank count): the ranks take them
one at a time as they go (:meth:`parallel.RankContext.run_everywhere`). Everything that can be
checked fails here, before any frame is scored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import config
from .encode import EncodeSettings, check_encoder
from .errors import ConfigError, OutputError
from .files import fingerprint, same_file, writable_dir
from .formats import READABLE_OUTPUTS
from .hwcodecs import beside_gpu
from .mux import AUDIO_FALLBACK, AudioTrack, plan_audio
from .segment import Segment
from .staging import DEFAULT_STAGING, Staging, job_key
from .video import Limits, VideoInfo, probe

log = logging.getLogger(__name__)

# OpenCV's DIS optical flow refuses smaller frames (temporal blend and flicker meter).
MIN_FLOW_SIDE = 12
# Containers the output may be written in without naming video.format.
_OUTPUT_SUFFIXES = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass(frozen=True)
class Plan:
    """Every rank receives a copy."""

    info: VideoInfo
    audio: tuple[AudioTrack, ...]  # each input audio stream: copied, or converted for this container
    segments: tuple[Segment, ...]  # the whole video, in order, whatever the rank count
    output: Path
    container_format: str
    report: Path
    preview: Path | None
    settings: EncodeSettings
    staging: Staging
    temporal: dict[str, Any]  # cfg.temporal: alpha, flow, measure


def make_plan(cfg: DictConfig) -> Plan:
    """Root: the plan, or the :class:`~mpistyle.errors.MpistyleError` that stops the job
    before it starts."""
    output = Path(cfg.output).expanduser().absolute()
    container_format = _container_format(cfg, output)
    info = probe(str(Path(cfg.input).expanduser()), Limits(**config.plain(cfg.limits)))
    if (cfg.temporal.alpha > 0 or cfg.temporal.measure) and min(info.width, info.height) < MIN_FLOW_SIDE:
        raise ConfigError(
            f"temporal.* needs frames of at least {MIN_FLOW_SIDE} pixels a side (optical flow); "
            f"this video is {info.width}x{info.height}: leave temporal.alpha and temporal.measure off"
        )
    report, preview = _outputs(cfg, output)
    settings = EncodeSettings.of(cfg.video)
    check_encoder(settings, info, container_format)
    if beside_gpu(settings) != settings:  # x264's settings beside GPUs
        try:
            check_encoder(beside_gpu(settings), info, container_format)
        except ConfigError as err:
            raise ConfigError(f"video.gpu_preset={settings.gpu_preset}: {err}") from None
    # The audio plan changes the output's audio, never the staged video: not in the staging key.
    audio = plan_audio(info, container_format)
    segments = info.segments(cfg.video.segment_seconds)
    _log_plan(info, segments, audio, container_format)
    return Plan(
        info=info,
        audio=audio,
        segments=segments,
        output=output,
        container_format=container_format,
        report=report,
        preview=preview,
        settings=settings,
        staging=Staging(_staging_root(cfg, output), _staging_key(cfg, info, settings, container_format)),
        temporal=config.plain(cfg.temporal),
    )


def _container_format(cfg: DictConfig, output: Path) -> str:
    container_format = cfg.video.format or _OUTPUT_SUFFIXES.get(output.suffix.lower())
    if container_format is None:
        raise ConfigError(
            f"cannot tell the container from the output name {output.name}: "
            f"use one of {', '.join(sorted(_OUTPUT_SUFFIXES))} or set video.format"
        )
    if container_format not in READABLE_OUTPUTS:
        raise ConfigError(
            f"video.format={container_format}: mpistyle writes only containers it reads back (the preview is "
            f"decoded from the output): one of {', '.join(sorted(READABLE_OUTPUTS))}"
        )
    return str(container_format)


def _outputs(cfg: DictConfig, output: Path) -> tuple[Path, Path | None]:
    """The report and preview paths; the output's, report's and preview's folders created and
    checked writable."""
    report = Path(cfg.report.path).expanduser() if cfg.report.path else output.with_name(f"{output.name}.report.json")
    preview = None
    if cfg.report.preview_frames > 0:
        preview = Path(cfg.report.preview).expanduser() if cfg.report.preview else output.with_name(f"{output.name}.preview.png")
    # Every path the job writes is checked here, before any frame is scored.
    files = (("output", "output", output), ("report.path", "report", report), ("report.preview", "preview", preview))
    written = [(key, what, path) for key, what, path in files if path is not None]
    checked: set[Path] = set()  # each folder written to once (by default all three share one)
    for key, what, path in written:
        if path.is_dir():
            raise OutputError(f"{key} is a directory: {path} (give a file name)")
        if same_file(path, Path(cfg.input).expanduser()):
            raise ConfigError(f"{key} is the input ({cfg.input}): choose another path")
        if path.parent not in checked:
            writable_dir(path.parent, f"{what} directory")
            checked.add(path.parent)
    for index, (key, _, path) in enumerate(written):
        for other, _, other_path in written[index + 1 :]:
            if same_file(path, other_path):
                raise ConfigError(f"{key} and {other} are the same file ({path}): give each its own path")
    return report, preview


def _staging_root(cfg: DictConfig, output: Path) -> Path:
    return Path(cfg.staging.root).expanduser() if cfg.staging.root else output.parent / DEFAULT_STAGING


def _staging_key(cfg: DictConfig, info: VideoInfo, settings: EncodeSettings, container_format: str) -> str:
    """What the staged segments depend on: a re-run that agrees on all of it reuses them."""
    model = config.plain(cfg.model)
    video = config.plain(cfg.video)
    return job_key(
        {
            "input": fingerprint(Path(info.path)),
            "frames": info.frames,
            "model": model,
            # Compiled and reduced-precision kernels round differently: not the same frames.
            "compile": cfg.compile,
            "precision": cfg.precision,
            "on_damage": cfg.on_damage,  # a segment concealed under one policy would fail the other
            # Blending changes the frames; measuring alone does not.
            "temporal": {"alpha": cfg.temporal.alpha, "flow": cfg.temporal.flow} if cfg.temporal.alpha > 0 else None,
            # Staged segments are encoded: other settings, container headers or cuts are other bytes.
            "video": {**video, "format": container_format},
            "encoder_options": settings.encoder_options(),  # as opened, with what mpistyle adds
            # A checkpoint retrained in place is a new model: key on its contents too.
            "model_files": {k: fingerprint(f) for k, f in _files_named(model).items()},
        }
    )


def _files_named(model: dict[str, Any]) -> dict[str, Path]:
    """The model settings that name a file (checkpoint, weights, style image)."""
    paths = {key: Path(value).expanduser() for key, value in model.items() if isinstance(value, str)}
    return {key: path for key, path in paths.items() if path.is_file()}


def _log_plan(info: VideoInfo, segments: tuple[Segment, ...], audio: tuple[AudioTrack, ...], container_format: str) -> None:
    log.info(
        "input %s: %s %dx%d, %d frames, %.2f s, %d GOPs in %d segments, %d audio stream(s)",
        info.path, info.codec, info.width, info.height, info.frames, info.duration_s,
        len(info.keyframe_pts), len(segments), len(info.audio_streams),
    )
    for track in audio:
        if track.convert:
            log.warning(
                "the input's audio stream #%d (%s) cannot be copied into %s: it is converted to %s",
                track.stream, track.codec, container_format, AUDIO_FALLBACK,
            )
    for dropped in info.dropped_streams:
        log.warning("the input's %s stream is not copied to the output", dropped)
