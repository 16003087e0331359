"""Many videos in one job (``inputs=``, :mod:`mpistyle.batch_inputs`): every rank works on each
video in turn through :func:`mpistyle.pipeline.run`, so a batch keeps every guarantee of a single
job (the same bits for any rank count, atomic output, resume from staging), while the start-up
and each model's load and compile are paid once for the whole batch, not once per video.

A video that cannot be done (unreadable, hostile, refused settings, damaged under
``on_damage=fail``) fails alone: the error every rank agreed on is written next to its output
(``<output>.error.json``: the one-line reason and exit code) and the batch goes on. A video
delivered by an earlier attempt of the same batch is not done again. The batch report
(``<output_dir>/batch-report.json``) lists every video's outcome; the exit code says whether all
were done (0), some failed (8), or the job itself failed (its error's code).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import av.error
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import config
from .batch_inputs import BatchItem, read_inputs
from .errors import ConfigError, InputError, ModelError, MpistyleError, OutputError, SomeVideosFailed
from .files import write_atomic
from .parallel import RankContext
from .pipeline import Scorers, run
from .plan import make_plan
from .report import write_json
from .staging import Staging
from .video import open_input

log = logging.getLogger(__name__)

# What fails one video and not the batch: the video itself, its settings, its output location
# or its model setting. A staging, storage or internal error, a stop or a signal ends the job.
_PER_VIDEO = (ConfigError, InputError, OutputError, ModelError)
DELIVERED = ".mpistyle-delivered"  # in each output's folder: one marker per video delivered


@dataclass
class VideoOutcome:
    """One video's line in the batch report."""

    source: str
    input: str | None
    output: str | None
    status: str  # done, delivered before, failed
    frames: int | None = None
    seconds: float | None = None
    fps: float | None = None
    exit_code: int | None = None
    error: str | None = None


def run_batch(cfg: DictConfig, ctx: RankContext | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Do every video ``cfg.inputs`` names; returns the batch report (on every rank). Raises
    :class:`SomeVideosFailed` once done if any video failed."""
    ctx = ctx or RankContext.world()
    started = time.perf_counter()
    items = ctx.from_root(lambda: read_inputs(cfg.inputs, cfg.output_dir))
    # compile=auto weighs the work a compile serves: every video of the batch with the same model
    # setting and frame size (a batch of short clips pays one compile for all of them).
    shapes = ctx.from_root(lambda: [_shape(cfg, item) for item in items])
    served: dict[str, int] = {}
    for shape in shapes:
        if shape is not None:
            served[shape[0]] = served.get(shape[0], 0) + shape[1]
    scorers: Scorers = {}  # the models loaded so far, by setting and frame size: each loaded once
    outcomes: list[VideoOutcome] = []
    per_rank_busy = [0.0] * ctx.size
    for number, (item, shape) in enumerate(zip(items, shapes, strict=True), 1):
        pixels = served[shape[0]] if shape is not None else None
        outcome = _one(cfg, ctx, item, scorers, f"{run_id or 'batch'}-{number}", per_rank_busy, pixels)
        outcomes.append(outcome)
        if ctx.is_root:
            _log_progress(number, len(items), outcome, outcomes, time.perf_counter() - started)
    report = _batch_report(cfg, items, outcomes, per_rank_busy, time.perf_counter() - started)
    ctx.from_root(lambda: write_json(report_path(cfg), report))
    if ctx.is_root:
        log.info("batch report: %s", report_path(cfg))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise SomeVideosFailed(
            f"{len(failed)} of {len(outcomes)} videos failed (first: {failed[0].source}: {failed[0].error}); "
            f"the others are done: see {report_path(cfg)}"
        )
    return report


def _one(
    cfg: DictConfig, ctx: RankContext, item: BatchItem, scorers: Scorers, run_id: str, busy: list[float],
    compile_pixels: int | None,
) -> VideoOutcome:
    """Do one video (every rank calls this with the same item) and say how it went."""
    where = VideoOutcome(item.source, str(item.input) if item.input else None, str(item.output) if item.output else None, "")
    if item.error is not None:
        return _failed(where, ConfigError(item.error), item, ctx.is_root)
    try:
        video_cfg = video_config(cfg, item)
        config.check(video_cfg)
        planned = ctx.from_root(lambda: make_plan(video_cfg))
        key = planned.staging.dir.name
        if ctx.from_root(lambda: _delivered(item, key)):
            if ctx.is_root:
                _tidy_delivered(item, planned.staging, key, video_cfg.staging.keep)
            where.status = "delivered before"
            return where
        began = time.perf_counter()
        # Marked on the root the moment the output is in place: a stop after it (during the
        # preview or report) does not deliver the video again.
        report = run(
            video_cfg, ctx, run_id, scorers, delivered=lambda: _mark_delivered(item, key), compile_pixels=compile_pixels,
            planned=planned,
        )
    except ModelError as err:
        if not item.settings:  # the job's own model setting: not this video's fault, every video's
            raise _job_error(err) from None
        return _failed(where, err, item, ctx.is_root)
    except _PER_VIDEO as err:
        return _failed(where, err, item, ctx.is_root)
    except MpistyleError as err:
        raise _job_error(err) from None
    seconds = time.perf_counter() - began
    for rank in report["per_rank"]:
        busy[rank["rank"]] += rank["seconds_total"]
    where.status, where.frames, where.seconds = "done", report["frames"], round(seconds, 3)
    where.fps = round(report["frames"] / seconds, 3) if seconds else None
    return where


def _shape(cfg: DictConfig, item: BatchItem) -> tuple[str, int] | None:
    """The video's model setting and frame size (as one key), and its pixels, from the
    container's header alone (a file's index is read later, when its turn comes); None if it
    cannot be known (the video's own turn then says why)."""
    if item.error is not None:
        return None
    try:
        video_cfg = video_config(cfg, item)
        with open_input(str(item.input)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
                container.duration / 1_000_000 if container.duration else 0.0)
            frames = stream.frames or int(seconds * float(rate or 0))
            width, height = stream.codec_context.width, stream.codec_context.height
    except (MpistyleError, IndexError, av.error.FFmpegError, ValueError, TypeError):
        return None
    key = json.dumps([config.plain(video_cfg.model), width, height], sort_keys=True, default=str)
    return key, frames * width * height


def _job_error(err: MpistyleError) -> MpistyleError:
    """An error that ends the batch: never taken for a refusal before work (that would remove
    the run's log, though earlier videos were done)."""
    err.before_work = False
    return err


def video_config(cfg: DictConfig, item: BatchItem) -> DictConfig:
    """The batch's config for one video: its input and output, and its own settings, each set
    as a value (never parsed: a path or value is never read as YAML or an interpolation)."""
    video_cfg = cfg.copy()
    with open_dict(video_cfg):
        video_cfg.inputs, video_cfg.output_dir = None, None
    video_cfg.input, video_cfg.output = str(item.input), str(item.output)
    try:
        for key, value in item.settings.items():
            OmegaConf.update(video_cfg, key, value, merge=False)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{item.source}: a setting this job's model cannot take ({reason})") from None
    return video_cfg


def _failed(outcome: VideoOutcome, err: MpistyleError, item: BatchItem, write: bool) -> VideoOutcome:
    """Record a video that failed (``write``: its error file too, on the root alone)."""
    outcome.status, outcome.exit_code, outcome.error = "failed", err.exit_code, str(err).splitlines()[0]
    log.warning("video %s failed (exit %d): %s", item.source, err.exit_code, outcome.error)
    if write and item.output is not None:
        try:
            item.output.parent.mkdir(parents=True, exist_ok=True)
            write_json(error_path(item.output), {"error": outcome.error, "exit_code": err.exit_code})
        except (OSError, OutputError) as write_err:
            log.warning("cannot write %s: %s", error_path(item.output), write_err)
    return outcome


def error_path(output: Path) -> Path:
    return output.with_name(output.name + ".error.json")


def _marker(item: BatchItem) -> Path:
    """Where the record of this output's delivery is kept: one per output file."""
    assert item.output is not None
    name = hashlib.sha256(str(item.output.resolve()).encode()).hexdigest()[:16]
    return item.output.parent / DELIVERED / name


def _delivered(item: BatchItem, key: str) -> bool:
    """Whether an earlier attempt delivered this output as it would be now: its record names
    this job key (the input's contents and the settings) and the output file is still the one
    it delivered (same size and modification time), not another run's since."""
    assert item.output is not None
    try:
        record = json.loads(_marker(item).read_text())
        stat = item.output.stat()
    except (OSError, ValueError):
        return False
    return bool(record == {"key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def _mark_delivered(item: BatchItem, key: str) -> None:
    """Root, the moment the output is in place: record it, and drop an earlier failure's file."""
    assert item.output is not None
    error_path(item.output).unlink(missing_ok=True)
    marker = _marker(item)
    stat = item.output.stat()
    marker.parent.mkdir(exist_ok=True)
    write_atomic(marker, json.dumps({"key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}).encode())


def _tidy_delivered(item: BatchItem, staging: Staging, key: str, keep: bool) -> None:
    """A video an earlier attempt delivered, then stopped before tidying up after."""
    assert item.output is not None
    error_path(item.output).unlink(missing_ok=True)
    if not keep:
        Staging(staging.dir.parent, key, key).remove()  # what any kind of kernels staged for it


def report_path(cfg: DictConfig) -> Path:
    """``<output_dir>/batch-report.json``, or beside the inputs file when there is no output_dir."""
    folder = Path(cfg.output_dir).expanduser() if cfg.output_dir else Path(cfg.inputs).expanduser().parent
    return folder.absolute() / "batch-report.json"


def _batch_report(
    cfg: DictConfig, items: list[BatchItem], outcomes: list[VideoOutcome], busy: list[float], wall: float
) -> dict[str, Any]:
    frames = sum(o.frames or 0 for o in outcomes if o.status == "done")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "delivered before", "failed")}
    return {
        "inputs": str(cfg.inputs),
        "videos": len(items),
        **{status.replace(" ", "_"): count for status, count in counts.items()},
        "frames": frames,
        "wall_s": round(wall, 3),
        "fps": round(frames / wall, 3) if wall else None,
        # Each rank's share of the wall time spent inside a video's scoring (the rest: start-up,
        # planning, joining, and waiting at the end of each video for the others).
        "per_rank_busy": [round(seconds / wall, 3) if wall else None for seconds in busy],
        "per_video": [asdict(o) for o in outcomes],
        "settings": config.plain(cfg.model),
    }


def _log_progress(number: int, total: int, outcome: VideoOutcome, outcomes: list[VideoOutcome], elapsed: float) -> None:
    done = sum(o.status == "done" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    eta = elapsed / number * (total - number)
    what = f"{outcome.frames} frames in {outcome.seconds:.1f} s" if outcome.status == "done" else outcome.status
    log.info(
        "video %d/%d %s: %s (%s); batch: %d done, %d failed, %d frames, %.0f s, about %.0f s to go",
        number, total, outcome.status, outcome.source, what, done, failed,
        sum(o.frames or 0 for o in outcomes), elapsed, eta,
    )
