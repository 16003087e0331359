"""``run(cfg)``: one job from input video to output video, on one rank or many.

  probe (root)  ->  load model (all)  ->  decode + score + encode + stage (all, own segments)
                ->  join segments by stream copy + audio (root)  ->  report + preview (root)

Every stage is owned by one module (video, model, scoring, staging, report); this module only
wires them together, and :mod:`mpistyle.parallel` is the only place ranks are handled.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from . import __version__, config, signals
from .devices import pick_device, set_threads
from .errors import ConfigError, JobStopped, ModelError, MpistyleError, OutputError
from .formats import READABLE_OUTPUTS
from .overlap import Ahead, Behind, InOrder, Now
from .parallel import RankContext, attempt, partition, unwrap
from .report import Progress, StageTimer, preview_grid, preview_indices, write_json, write_png
from .scoring import Scorer, default_batch_size
from .staging import DEFAULT_STAGING, SegmentWriter, Staging, fingerprint, job_key
from .video import (
    AUDIO_FALLBACK,
    AudioTrack,
    Damage,
    EncodeSettings,
    Limits,
    Muxer,
    SegmentEncoder,
    Share,
    VideoInfo,
    check_encoder,
    decode_share,
    output_size,
    plan_audio,
    probe,
    read_frames,
    shares_for,
    stream_dts,
)

log = logging.getLogger(__name__)

# OpenCV's DIS optical flow refuses smaller frames (temporal blend and flicker meter).
MIN_FLOW_SIDE = 12
# Containers the output may be written in without naming video.format.
_OUTPUT_SUFFIXES = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass(frozen=True)
class Plan:
    """What the root decides before any frame is scored; every rank receives a copy."""

    info: VideoInfo
    audio: tuple[AudioTrack, ...]  # each input audio stream: copied, or converted for this container
    segments: list[range]  # GOPs of each independently encoded segment, whatever the rank count
    shares: list[Share]
    output: Path
    partial: Path
    container_format: str
    settings: EncodeSettings
    report: Path
    preview: Path | None
    staging: Staging
    temporal: dict[str, Any]  # cfg.temporal: alpha, flow, measure


def run(cfg: DictConfig, ctx: RankContext | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Restyle ``cfg.input`` into ``cfg.output``. Returns the job report (on every rank).

    Raises an :class:`~mpistyle.errors.MpistyleError` subclass, the same on every rank, when
    the job cannot be done; the input is never modified and no partial output is left.
    """
    config.check(cfg)
    ctx = ctx or RankContext.world()
    run_id = run_id or os.environ.get("MPISTYLE_RUN_ID") or f"{os.getpid()}"
    timer = StageTimer()
    started = time.perf_counter()

    with timer("probe"):
        plan = ctx.share(lambda: make_plan(cfg, ctx.size, run_id))
    share = plan.shares[ctx.rank]
    with timer("load_model"):
        scorer = ctx.check_all(lambda: _then_check(build_scorer(cfg, ctx)))
    ctx.check_all(plan.staging.create)
    last = max(share.start, share.stop - 1)
    log.info(
        "rank %d/%d on %s (%s): frames %d-%d (%d of %d)",
        ctx.rank, ctx.size, ctx.host, scorer.device, share.start, last, share.frames, plan.info.frames,
    )

    progress = Progress(plan.info.frames, cfg.report.progress, cfg.report.progress_interval_s) if ctx.is_root else None
    overlap = cfg.overlap if cfg.overlap is not None else scorer.device.type != "cpu"
    with timer("score"):
        scoring = attempt(
            lambda: ctx.run_everywhere(
                lambda tick: {"host": ctx.host, **score_share(plan, share, scorer, tick, cfg.on_damage, overlap)},
                progress.add if progress else _ignore,
            )
        )
    if progress:
        progress.close()

    def finish() -> dict[str, Any]:
        summaries = unwrap(scoring)
        return finish_job(cfg, plan, summaries, timer, started, run_id)

    return ctx.share(finish)


def _then_check(value: Any) -> Any:
    signals.check()
    return value


def _ignore(frames: int) -> None:
    del frames


def make_plan(cfg: DictConfig, ranks: int, run_id: str) -> Plan:
    """Root: probe the input, check every place the job will write and the encoder settings,
    and split the frames among the ranks. Everything that can be checked fails here, before
    any frame is scored."""
    output = Path(cfg.output).expanduser().absolute()
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
    info = probe(str(Path(cfg.input).expanduser()), Limits(**config.plain(cfg.limits)))
    if (cfg.temporal.alpha > 0 or cfg.temporal.measure) and min(info.width, info.height) < MIN_FLOW_SIDE:
        raise ConfigError(
            f"temporal.* needs frames of at least {MIN_FLOW_SIDE} pixels a side (optical flow); "
            f"this video is {info.width}x{info.height}: leave temporal.alpha and temporal.measure off"
        )
    if output.is_dir():
        raise OutputError(f"output is a directory: {output}")
    if output.exists() and os.path.samefile(output, cfg.input):
        raise ConfigError(f"output is the input ({cfg.input}): choose another output path")
    report = Path(cfg.report.path).expanduser() if cfg.report.path else output.with_name(f"{output.name}.report.json")
    preview = None
    if cfg.report.preview_frames > 0:
        preview = Path(cfg.report.preview).expanduser() if cfg.report.preview else output.with_name(f"{output.name}.preview.png")
    for what, path in (("output", output), ("report", report), ("preview", preview)):
        if path is not None:
            _writable_dir(path.parent, what)
    video = config.plain(cfg.video)
    segment_seconds = video.pop("segment_seconds")
    settings = EncodeSettings(**video)
    check_encoder(settings, info, container_format)
    # The audio plan changes the output's audio, never the staged video: not in the staging key.
    audio = plan_audio(info, container_format)
    segments = info.segments(segment_seconds)
    parts = partition([_frames_in(info, s) for s in segments], ranks)

    model = config.plain(cfg.model)
    key = job_key(
        {
            "input": fingerprint(Path(info.path)),
            "frames": info.frames,
            "model": model,
            "compile": cfg.compile,  # compiled kernels round differently: not the same frames
            "on_damage": cfg.on_damage,  # a segment concealed under one policy would fail the other
            # Blending changes the frames; measuring alone does not.
            "temporal": {"alpha": cfg.temporal.alpha, "flow": cfg.temporal.flow} if cfg.temporal.alpha > 0 else None,
            # Staged segments are encoded: other settings, container headers or cuts are other bytes.
            "video": {**video, "format": container_format, "segment_seconds": segment_seconds},
            "encoder_options": settings.encoder_options(),  # as opened, with what mpistyle adds
            # A checkpoint retrained in place is a new model: key on its contents too.
            "model_files": {k: fingerprint(f) for k, f in _files_named(model).items()},
        }
    )
    staging_root = Path(cfg.staging.root).expanduser() if cfg.staging.root else output.parent / DEFAULT_STAGING
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
    return Plan(
        info=info,
        audio=audio,
        segments=segments,
        shares=shares_for(info, _gops_of(segments, parts, len(info.keyframe_pts))),
        output=output,
        partial=output.with_name(f".{output.stem}.partial-{run_id}{output.suffix}"),
        container_format=container_format,
        settings=settings,
        report=report,
        preview=preview,
        staging=Staging(staging_root, key),
        temporal=config.plain(cfg.temporal),
    )


def _files_named(model: dict[str, Any]) -> dict[str, Path]:
    """The model settings that name a file (checkpoint, weights, style image)."""
    paths = {key: Path(value).expanduser() for key, value in model.items() if isinstance(value, str)}
    return {key: path for key, path in paths.items() if path.is_file()}


def _frames_in(info: VideoInfo, gops: range) -> int:
    start, stop = info.frame_range(gops)
    return stop - start


def _gops_of(segments: list[range], parts: list[range], gop_count: int) -> list[range]:
    """Ranges of segments (from the partitioner) -> the GOPs they cover; an empty part stays empty."""
    starts = [s.start for s in segments] + [gop_count]
    return [range(starts[part.start], starts[part.stop]) for part in parts]


def _writable_dir(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and check this process can write in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the {what} directory {directory}: {err.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise OutputError(f"the {what} directory is not writable: {directory}")


def build_scorer(cfg: DictConfig, ctx: RankContext) -> Scorer:
    device = pick_device(cfg.device, ctx.local_rank)
    if device.type == "cpu":
        set_threads(cfg.threads, ctx.local_size)
    try:
        model = instantiate(cfg.model)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MpistyleError):
            raise cause from None
        reason = (str(cause or err).strip().splitlines() or [type(cause or err).__name__])[0]
        raise ConfigError(f"cannot build the model {cfg.model.get('_target_')}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{cfg.model._target_} returned a {type(model).__name__}, not a torch.nn.Module")
    return Scorer(model, device, cfg.batch_size or default_batch_size(device), cfg.compile)


def score_share(
    plan: Plan, share: Share, scorer: Scorer, tick: Callable[[int], bool], on_damage: str = "fail", overlap: bool = False
) -> dict[str, Any]:
    """Decode, score, encode and stage this rank's segments, a batch at a time (memory stays
    fixed: a few batches of frames, plus the encoder's queue and one segment's packets).

    With ``overlap``, decoding runs ahead of the model and encoding plus staging behind it, each
    in its own thread (:mod:`mpistyle.overlap`), so the model waits for neither; the frames go
    through each stage in the same order as they do one after another.

    Segments already staged by an earlier attempt of the same job are reused, whatever the
    rank count was then.
    """
    info = plan.info
    mine = [s for s in plan.segments if share.gops.start <= s.start and s.stop <= share.gops.stop]
    began = time.perf_counter()
    missing = [s for s in mine if not plan.staging.has(*info.frame_range(s))]
    reused = share.frames - sum(_frames_in(info, s) for s in missing)
    damage = Damage()
    for segment in mine:
        if segment not in missing:  # what an earlier attempt met while decoding it still counts
            damage.add(Damage(**plan.staging.damage(*info.frame_range(segment))))
    if reused:
        _step(tick, reused)
    temporal = _temporal_stage(plan.temporal)
    score_s = temporal_s = 0.0
    batches = _decoded(info, missing, scorer.batch_size, on_damage)
    stager = _SegmentStager(plan)
    decoded: Ahead[tuple[np.ndarray, Damage]] | InOrder[tuple[np.ndarray, Damage]]
    behind: Behind | Now
    if overlap:
        decoded, behind = Ahead(batches, _AHEAD_BATCHES, "mpistyle-decode"), Behind(_BEHIND_BATCHES, "mpistyle-encode")
    else:
        decoded, behind = InOrder(batches), Now()
    try:
        last_stop = -1
        for segment in missing:
            start, stop = info.frame_range(segment)
            if temporal:
                # The blend restarts with each segment, so a frame's output never depends on
                # where a rank's share began; the meters still measure the pair across the cut.
                temporal.reset(contiguous=start == last_stop)
            behind.submit(partial(stager.begin, start, stop))
            count = 0
            for first in range(start, stop, scorer.batch_size):
                if first > start:
                    _step(tick, count)  # not after the segment's last batch: that waits for the file
                batch, met = next(decoded)
                count = len(batch)
                mark = time.perf_counter()
                styled = scorer(batch)
                score_s += time.perf_counter() - mark
                if temporal:
                    mark = time.perf_counter()
                    styled = temporal(batch, styled)
                    temporal_s += time.perf_counter() - mark
                behind.submit(partial(stager.add, styled))
            # The decoder has counted the segment's damage by the time it handed its last frame.
            behind.submit(partial(stager.end, asdict(met)))
            damage.add(met)
            last_stop = stop
            # Stopping here keeps the segment: the encoder thread finishes it first (below).
            _step(tick, count)
        behind.drain()  # raises what failed in the encoder thread
    finally:
        decoded.close()
        # Whatever stopped the loop, the encoder thread first runs what it was given: every
        # segment scored whole is staged (a resume reuses it); the one cut short never got
        # its end, so nothing of it is written.
        behind.close()
    total = time.perf_counter() - began
    seconds = {
        "decode": decoded.busy_s, "score": score_s, "temporal": temporal_s, "encode": stager.encode_s,
        "stage": stager.stage_s,
        # How long the model waited for decoded frames, and for room behind it (or for the
        # last segments to be staged): near 0 when the model is the bottleneck.
        "waited": decoded.waited_s + behind.waited_s,
    }
    log.info(
        "scored %d frames in %.2f s (score %.2f; in other threads: decode %.2f, encode %.2f, stage %.2f; waited %.2f)%s",
        share.frames - reused, total, score_s, seconds["decode"], seconds["encode"], seconds["stage"],
        seconds["waited"], f", {reused} reused from staging" if reused else "",
    )
    if damage.damaged or damage.concealed or damage.packet_errors:
        log.warning(
            "damaged input: %d corrupt frame(s) kept as concealed, %d missing frame(s) repeated, %d bad packet(s)",
            damage.damaged, damage.concealed, damage.packet_errors,
        )
    return {
        "device": str(scorer.device),
        "threads": torch.get_num_threads() if scorer.device.type == "cpu" else None,
        "overlap": overlap,
        "frames": share.frames,
        "first_frame": share.start,
        "segments": len(mine),
        "frames_reused": reused,
        "damage": asdict(damage),
        "seconds": seconds,
        "seconds_total": total,
        # ru_maxrss is in KiB on Linux: the peak of this rank's process so far.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "flicker": _flicker_states(temporal),
        "fps": (share.frames - reused) / total if total > 0 and share.frames > reused else None,
    }


# Batches decoded ahead of the model, and scored batches waiting for the encoder: enough to
# ride out a slow keyframe or a segment's staging write, few enough to keep memory fixed.
_AHEAD_BATCHES = 2
_BEHIND_BATCHES = 4


def _decoded(info: VideoInfo, segments: list[range], batch_size: int, on_damage: str) -> Iterator[tuple[np.ndarray, Damage]]:
    """The segments' frames in batches of up to ``batch_size`` that never cross a segment,
    each with its segment's damage count so far.

    Each segment is decoded from its own keyframe, as it would be if it began a rank's share:
    FFmpeg conceals a damaged frame from the picture decoded before it, so that picture must
    not depend on the rank count.
    """
    for segment in segments:
        start, stop = info.frame_range(segment)
        met = Damage()
        frames = decode_share(info, shares_for(info, [segment])[0], on_damage, met)
        try:
            for first in range(start, stop, batch_size):
                batch = np.empty((min(batch_size, stop - first), info.height, info.width, 3), np.uint8)
                for slot in range(len(batch)):
                    batch[slot] = next(frames)
                yield batch, met
        finally:
            frames.close()


class _SegmentStager:
    """Encodes one segment at a time and stages its packets; runs in the encoder thread."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._encoder: SegmentEncoder | None = None
        self._writer: SegmentWriter | None = None
        self.encode_s = 0.0
        self.stage_s = 0.0

    def begin(self, start: int, stop: int) -> None:
        mark = time.perf_counter()
        self._encoder = SegmentEncoder(self._plan.info, self._plan.settings, start, self._plan.container_format)
        self._writer = self._plan.staging.writer(start, stop)
        self.encode_s += time.perf_counter() - mark

    def add(self, frames: np.ndarray) -> None:
        assert self._encoder is not None and self._writer is not None
        mark = time.perf_counter()
        self._writer.add(self._encoder.encode(frames))
        self.encode_s += time.perf_counter() - mark

    def end(self, damage: dict[str, int]) -> None:
        assert self._encoder is not None and self._writer is not None
        mark = time.perf_counter()
        self._writer.add(self._encoder.finish())
        self._writer.extradata = self._encoder.extradata
        self._writer.damage = damage
        self.encode_s += time.perf_counter() - mark
        mark = time.perf_counter()
        self._writer.close(complete=True)
        self.stage_s += time.perf_counter() - mark
        self._encoder = self._writer = None


def _temporal_stage(settings: dict[str, Any]) -> Any:
    """The blend and flicker meters when asked for (OpenCV is imported only then)."""
    if not (settings["alpha"] > 0 or settings["measure"]):
        return None
    from .temporal import TemporalStage

    return TemporalStage(settings["alpha"], settings["measure"], settings["flow"])


def _flicker_states(temporal: Any) -> dict[str, Any] | None:
    """This rank's warping-error sums (output, and the model's own frames when blending)."""
    if temporal is None or temporal.meter is None:
        return None
    own = temporal.meter_styled or temporal.meter
    return {"output": asdict(temporal.meter.state()), "unblended": asdict(own.state())}


def _flicker_report(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Warping error over every frame pair the ranks scored in this run (pairs across two ranks'
    shares, and segments reused from staging, are not measured)."""
    states = [s["flicker"] for s in summaries if s.get("flicker")]
    if not states:
        return None
    from .flicker import FlickerState

    def total(which: str) -> FlickerState:
        result = FlickerState()
        for state in states:
            result = result + FlickerState(**state[which])
        return result

    output, unblended = total("output"), total("unblended")
    return {
        "metric": "warping error (Lai et al. 2018): RGB in [0, 1], mean over frame pairs; flow: OpenCV DIS",
        "output": output.error_sum / output.pairs if output.pairs else None,
        "unblended": unblended.error_sum / unblended.pairs if unblended.pairs else None,
        "pairs": output.pairs,
        "occluded_fraction": output.masked_sum / output.pairs if output.pairs else None,
    }


def _step(tick: Callable[[int], bool], frames: int) -> None:
    """Report progress; give up at this safe point if the job is stopping."""
    if not tick(frames):
        signals.check()
        raise JobStopped("stopped because another rank failed")
    signals.check()


def finish_job(
    cfg: DictConfig, plan: Plan, summaries: list[dict[str, Any]], timer: StageTimer, started: float, run_id: str
) -> dict[str, Any]:
    """Root: join the staged segments in order by stream copy, with the audio, then report."""
    info = plan.info
    frame_ranges = [info.frame_range(segment) for segment in plan.segments]
    with timer("join"):
        dts = stream_dts([pts for start, stop in frame_ranges for pts in plan.staging.decode_order_pts(start, stop)])
        try:
            with Muxer(plan.partial, info, plan.settings, dts, plan.container_format, plan.audio) as muxer:
                for start, stop in frame_ranges:
                    muxer.add(*plan.staging.read(start, stop))
                    signals.check()
                muxer.finish()
            os.replace(plan.partial, plan.output)
        finally:
            plan.partial.unlink(missing_ok=True)
    wanted = preview_indices(info.frames, cfg.report.preview_frames) if plan.preview else []
    with timer("preview"):
        if plan.preview and wanted:
            # The styled side is decoded from the output: the preview shows what was delivered.
            sources = read_frames(info.path, wanted, info)
            styled = read_frames(str(plan.output), wanted, probe(str(plan.output)))
            write_png(plan.preview, preview_grid([(s, o[: s.shape[0], : s.shape[1]]) for s, o in zip(sources, styled)]))
    total = time.perf_counter() - started
    width, height = output_size(info.width, info.height)
    report = {
        "mpistyle_version": __version__,
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "input": {
            "path": info.path,
            "container": info.container,
            "codec": info.codec,
            "width": info.width,
            "height": info.height,
            "frames": info.frames,
            "duration_s": round(info.duration_s, 6),
            "average_fps": float(info.average_rate) if info.average_rate else None,
            "gops": len(info.keyframe_pts),
            "audio_streams": len(info.audio_streams),
            "rotation": info.rotation,
            "dropped_streams": list(info.dropped_streams),
        },
        "output": {
            "path": str(plan.output),
            "codec": plan.settings.codec,
            "segments": len(plan.segments),
            "width": width,
            "height": height,
            "frames": info.frames,
            "bytes": plan.output.stat().st_size,
            "audio": [{"stream": t.stream, "codec": t.codec, "action": t.action} for t in plan.audio],
        },
        "model": config.plain(cfg.model),
        "frames": info.frames,
        "frames_reused": sum(s["frames_reused"] for s in summaries),
        "damage": {
            "policy": cfg.on_damage,
            **{k: sum(s["damage"][k] for s in summaries) for k in summaries[0]["damage"]},
        },
        "ranks": len(summaries),
        "devices": [s["device"] for s in summaries],
        "per_rank": [dict(rank=rank, **summary) for rank, summary in enumerate(summaries)],
        "stages_s": {**{k: round(v, 4) for k, v in timer.seconds.items()}, "total": round(total, 4)},
        "fps": {
            "end_to_end": round(info.frames / total, 3) if total else None,
            "scoring": round(info.frames / timer.seconds["score"], 3) if timer.seconds.get("score") else None,
        },
        # Rank 0's peak including gathering and encoding (per_rank peaks are taken after scoring).
        "flicker": _flicker_report(summaries),
        "root_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "staging": str(plan.staging.dir) if cfg.staging.keep else None,
        "preview": str(plan.preview) if plan.preview and wanted else None,
    }
    write_json(plan.report, report)
    if not cfg.staging.keep:
        plan.staging.remove(remove_empty_root=not cfg.staging.root)
    log.info(
        "wrote %s: %d frames in %.1f s (%.2f fps end to end) on %d rank(s)",
        plan.output, info.frames, total, info.frames / total if total else 0.0, len(summaries),
    )
    log.info("report: %s", plan.report)
    if report["preview"]:
        log.info("preview: %s", plan.preview)
    return report
