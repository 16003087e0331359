"""Many videos in one job (``inputs=``, :mod:`mpistyle.batch_inputs`): the videos are set up a
few dozen at a time (:func:`mpistyle.pipeline.prepare`) and their segments scored through one
queue (:func:`mpistyle.pipeline.run_queue`), so no rank waits while any video has work left and
each video is delivered the moment its last segment is staged, while the next ones are scored.
A batch keeps every guarantee of a single job (the same bits for any rank count, atomic output,
resume from staging), while the start-up and each model's load and compile are paid once for
the whole batch, not once per video.

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
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import av
import av.error
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import config
from .batch_inputs import BatchItem, read_inputs
from .delivery import Outcome
from .devices import pick_device
from .errors import ConfigError, InputError, ModelError, MpistyleError, OutputError, SomeVideosFailed
from .files import write_atomic
from .parallel import RankContext
from .pipeline import Job, Scorers, prepare, run_queue
from .plan import make_plan
from .report import StageTimer, write_json
from .staging import Staging
from .video import open_input
from .worker import Video

log = logging.getLogger(__name__)

# Videos set up at a time, then scored through one queue: enough that the wait at the end of a
# queue is rare, few enough that set-up does not hold the first delivery back for long.
_QUEUED = 32
_SCORERS_KEPT = 2  # models kept from one queue to the next
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
    per_rank_s: list[float] | None = None  # each rank's time on it


def run_batch(cfg: DictConfig, ctx: RankContext | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Do every video ``cfg.inputs`` names; returns the batch report (on every rank). Raises
    :class:`SomeVideosFailed` once done if any video failed."""
    ctx = ctx or RankContext.world()
    started = time.perf_counter()
    items = ctx.from_root(lambda: read_inputs(cfg.inputs, cfg.output_dir))
    try:
        # The job's own device is every video's: refused once, not video by video.
        ctx.check_all(lambda: pick_device(cfg.device, ctx.local_rank))
    except ConfigError as err:
        err.before_work = True
        raise
    # compile=auto weighs the work a compile serves: every video of the batch with the same model
    # setting and frame size (a batch of short clips pays one compile for all of them).
    shapes = ctx.from_root(lambda: [_shape(cfg, item) for item in items])
    served: dict[str, int] = {}
    for shape in shapes:
        if shape is not None:
            served[shape[0]] = served.get(shape[0], 0) + shape[1]
    scorers: Scorers = {}  # the models loaded so far, by setting and frame size: each loaded once
    outcomes: list[VideoOutcome | None] = [None] * len(items)
    progress = _Progress([shape[1] if shape else 0 for shape in shapes], started)

    ending = threading.Lock()  # videos end in the root's delivery thread and in its main thread

    def end(index: int, outcome: VideoOutcome) -> None:
        with ending:
            outcomes[index] = outcome
            if ctx.is_root:
                progress.ended(index, outcome)

    index = 0
    while index < len(items):
        # Set up the next videos, one after another (every rank takes part in each), then score
        # them all through one queue, each delivered as soon as its last segment is staged. A
        # queue holds up to _QUEUED videos of at most _SCORERS_KEPT model settings and frame
        # sizes: every model a queue needs stays loaded until its end.
        queued: list[tuple[int, Job, Video]] = []
        models: set[str] = set()
        tidy: list[tuple[str, Callable[[], None]]] = []  # (job key, what to remove) once the queue is done
        while index < len(items) and len(queued) < _QUEUED:
            shape = shapes[index]
            if shape is not None and shape[0] not in models and len(models) >= _SCORERS_KEPT:
                break
            pixels = served[shape[0]] if shape is not None else None
            prepared = _prepare(cfg, ctx, items[index], scorers, f"{run_id or 'batch'}-{index + 1}", pixels, tidy)
            if isinstance(prepared, VideoOutcome):
                end(index, prepared)
            else:
                queued.append((index, *prepared))
                if shape is not None:
                    models.add(shape[0])
            index += 1
        if queued:
            _score(ctx, items, queued, end)
        # What earlier attempts staged for videos delivered before, unless a video of this queue
        # has the same contents and settings (it shares the folder; it stays if that one failed).
        needed = {video.plan.staging.key for _, _, video in queued}
        for key, remove in tidy:
            if key not in needed:
                remove()
        while len(scorers) > _SCORERS_KEPT:  # a batch of many styles or sizes: the oldest go
            scorers.pop(next(iter(scorers)))
    done = [o for o in outcomes if o is not None]
    report = _batch_report(cfg, items, done, time.perf_counter() - started, ctx.size)
    ctx.from_root(lambda: write_json(report_path(cfg), report))
    if ctx.is_root:
        log.info("batch report: %s", report_path(cfg))
    failed = [o for o in done if o.status == "failed"]
    if failed:
        raise SomeVideosFailed(
            f"{len(failed)} of {len(done)} videos failed (first: {failed[0].source}: {failed[0].error}); "
            f"the others are done: see {report_path(cfg)}"
        )
    return report


def _prepare(
    cfg: DictConfig, ctx: RankContext, item: BatchItem, scorers: Scorers, run_id: str, compile_pixels: int | None,
    tidy: list[tuple[str, Callable[[], None]]],
) -> VideoOutcome | tuple[Job, Video]:
    """Set one video up for the queue (every rank calls this with the same item); or how it
    ended already: refused, or delivered by an earlier attempt (what that attempt left behind
    goes on ``tidy``, removed once the queue is done)."""
    where = _where(item)
    if item.error is not None:
        return _failed(where, ConfigError(item.error), item, ctx.is_root)
    try:
        video_cfg = video_config(cfg, item)
        config.check(video_cfg)
        timer = StageTimer()
        with timer("probe"):
            planned = ctx.from_root(lambda: make_plan(video_cfg))
        key = planned.staging.dir.name
        if ctx.from_root(lambda: _delivered(item, key)):
            if ctx.is_root:
                tidy.append((key, partial(_tidy_delivered, item, planned.staging, key, video_cfg.staging.keep)))
            where.status = "delivered before"
            return where
        # Recorded on the root as the output is renamed into place: a stop after it (during the
        # preview or report) does not deliver the video again.
        job = Job(video_cfg, run_id, timer, None, ready=lambda partial: _mark_delivered(item, key, partial))
        return job, prepare(job, ctx, scorers, compile_pixels, planned)
    except ModelError as err:
        if not item.settings:  # the job's own model setting: not this video's fault, every video's
            raise _job_error(err) from None
        return _failed(where, err, item, ctx.is_root)
    except _PER_VIDEO as err:
        return _failed(where, err, item, ctx.is_root)
    except MpistyleError as err:
        raise _job_error(err) from None


def _score(
    ctx: RankContext, items: list[BatchItem], queued: list[tuple[int, Job, Video]],
    end: Callable[[int, VideoOutcome], None],
) -> None:
    """Score the queued videos through one queue; each one's outcome to ``end`` as it ends (on
    the root: as it is delivered or fails; on the others: once every one has)."""

    def outcome(number: int, result: Outcome, write: bool) -> VideoOutcome:
        item = items[queued[number][0]]
        if isinstance(result, MpistyleError):
            return _failed(_where(item), result, item, write)
        where = _where(item)
        seconds = result["stages_s"]["total"]
        where.status, where.frames, where.seconds = "done", result["frames"], round(seconds, 3)
        where.fps = round(result["frames"] / seconds, 3) if seconds else None
        where.per_rank_s = [rank["seconds_total"] for rank in result["per_rank"]]
        return where

    try:
        results = run_queue(
            ctx, [(job, video) for _, job, video in queued],
            lambda number, result: end(queued[number][0], outcome(number, result, write=True)),
        )
    except MpistyleError as err:
        raise _job_error(err) from None
    if not ctx.is_root:
        for number, result in enumerate(results):
            end(queued[number][0], outcome(number, result, write=False))


def _where(item: BatchItem) -> VideoOutcome:
    return VideoOutcome(item.source, str(item.input) if item.input else None, str(item.output) if item.output else None, "")


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
    """Record a video that failed (``write``: log it and write its error file: the root alone)."""
    outcome.status, outcome.exit_code, outcome.error = "failed", err.exit_code, str(err).splitlines()[0]
    if write:
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


def _mark_delivered(item: BatchItem, key: str, partial: Path) -> None:
    """Root, with the complete output ``partial`` about to be renamed into place: record it (the
    record names its size and time, so it holds only once the rename is done: a stop between the
    two leaves a record no output matches), and drop an earlier failure's file."""
    assert item.output is not None
    error_path(item.output).unlink(missing_ok=True)
    marker = _marker(item)
    stat = partial.stat()
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
    cfg: DictConfig, items: list[BatchItem], outcomes: list[VideoOutcome], wall: float, ranks: int
) -> dict[str, Any]:
    busy = [sum(o.per_rank_s[rank] for o in outcomes if o.per_rank_s) for rank in range(ranks)]
    frames = sum(o.frames or 0 for o in outcomes if o.status == "done")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "delivered before", "failed")}
    return {
        "inputs": str(cfg.inputs),
        "videos": len(items),
        **{status.replace(" ", "_"): count for status, count in counts.items()},
        "frames": frames,
        "wall_s": round(wall, 3),
        "fps": round(frames / wall, 3) if wall else None,
        # Each rank's share of the wall time spent scoring segments (the rest: start-up, each
        # video's set-up, and waiting for the others at the end of each queue).
        "per_rank_busy": [round(seconds / wall, 3) if wall else None for seconds in busy],
        "per_video": [asdict(o) for o in outcomes],
        "settings": config.plain(cfg.model),
    }


class _Progress:
    """Rank 0's line as each video ends: the batch's counts so far, and the time left from the
    pixels still to score (read from the containers' headers) at the rate since the first video
    ended (the start-up and the first compile left out)."""

    def __init__(self, pixels: list[int], started: float) -> None:
        self._pixels = pixels
        self._left = sum(pixels)
        self._started = started
        self._scored = 0  # pixels of the videos done so far
        self._first: tuple[float, int] | None = None  # when the first video was done, and what was scored then
        self._ended: list[VideoOutcome] = []

    def ended(self, index: int, outcome: VideoOutcome) -> None:
        now = time.perf_counter()
        self._ended.append(outcome)
        self._left -= self._pixels[index]
        if outcome.status == "done":  # refused, failed or delivered before: no measure of the rate
            self._scored += self._pixels[index]
            if self._first is None:
                self._first = (now, self._scored)
        since, scored_then = self._first or (now, 0)
        rate = (self._scored - scored_then) / (now - since) if now > since else 0.0
        eta = f"about {self._left / rate:.0f} s to go" if rate > 0 else "time left known after the second video"
        if len(self._ended) == len(self._pixels):
            eta = "all ended"
        what = f"{outcome.frames} frames in {outcome.seconds:.1f} s" if outcome.status == "done" else outcome.status
        log.info(
            "video %d/%d %s: %s (%s); batch: %d done, %d failed, %d frames, %.0f s, %s",
            len(self._ended), len(self._pixels), outcome.status, outcome.source, what,
            sum(o.status == "done" for o in self._ended), sum(o.status == "failed" for o in self._ended),
            sum(o.frames or 0 for o in self._ended), now - self._started, eta,
        )
