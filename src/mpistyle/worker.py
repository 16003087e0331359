"""What every rank does with the segments it is handed, of whichever video of the job's queue:
decode, score, blend, encode, stage, and tell the root each segment staged.

Memory stays fixed: a few batches of frames, plus the encoder's queue and one segment's packets.
With ``overlap``, decoding runs ahead of the model and encoding plus staging behind it, each in
its own thread (:mod:`mpistyle.overlap`), so the model waits for neither; the frames go through
each stage in the same order as they do one after another, so the same bits come out.
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from . import signals
from .encode import EncodedPacket, SegmentEncoder
from .errors import InputError, JobStopped, MpistyleError
from .mux import reorder_depth
from .overlap import ReadAhead, ReadInline, RunBehind, RunInline
from .parallel import from_rank
from .plan import Plan
from .report import RankFacts, RankFlicker, SegmentDone, StageTimer, peak_rss_mb
from .scoring import Scorer
from .segment import Segment
from .staging import SegmentWriter
from .video import Cuvid, Damage, Decoded, VideoInfo, decode_segment

if TYPE_CHECKING:
    from .temporal import TemporalStage

log = logging.getLogger(__name__)

# Batches decoded ahead of the model, and scored batches waiting for the encoder: enough to
# ride out a slow keyframe or a segment's staging write, few enough to keep memory fixed.
_AHEAD_BATCHES = 2
_BEHIND_BATCHES = 4

Batches = ReadAhead[tuple[np.ndarray, Damage]] | ReadInline[tuple[np.ndarray, Damage]]


@dataclass(frozen=True)
class Video:
    """One video of the job's queue, as every rank holds it once it is set up."""

    plan: Plan
    scorer: Scorer  # this rank's
    ranks: tuple[RankFacts, ...]  # how every rank is set up for it
    on_damage: str = "fail"
    cuvid: Cuvid | None = None  # this rank's GPU decoder; None: the CPU's


@dataclass(frozen=True)
class VideoFailed:
    """A rank's note to the root: this video cannot be done (its input failed to decode)."""

    video: int
    error: MpistyleError


# What fails a video alone while its segments are scored: its input (a damaged or unreadable
# stream). Anything else (staging, the model, a stop) ends the job.
_VIDEO_ERRORS = (InputError,)


@dataclass(frozen=True)
class Worker:
    """One rank's means: the videos of the queue, and its link to the root."""

    videos: Sequence[Video]
    tick: Callable[[int], bool]  # frames done; False when the job is stopping
    take: Callable[[], tuple[int, int] | None]  # the next (video, segment number); None when there are no more
    note: Callable[[SegmentDone | VideoFailed], None]  # to the root
    overlap: bool = False


def score_segments(worker: Worker, rank: int) -> list[SegmentDone]:
    """Decode, score, encode and stage the segments this rank is handed, of whichever video,
    one at a time, a batch at a time, until there are none left; the root hears of each as
    soon as it is staged (:class:`SegmentDone`), and of a video whose input fails
    (:class:`VideoFailed`: the rank goes on with the next item).

    Segments already staged by an earlier attempt of the same job are reused, whatever the
    rank count was then.
    """
    behind: RunBehind | RunInline = RunBehind(_BEHIND_BATCHES, "mpistyle-encode") if worker.overlap else RunInline()
    stager = _SegmentStager(worker.videos, rank)
    temporal: dict[int, TemporalStage | None] = {}
    last_stop: dict[int, int] = {}
    sent: list[SegmentDone] = []

    def tell() -> None:  # what the encoder thread has staged, to the root
        while not stager.done.empty():
            done = stager.done.get()()
            sent.append(done)
            worker.note(done)

    def step(frames: int) -> None:
        tell()
        _step(worker.tick, frames)

    try:
        while True:
            tell()
            if (item := worker.take()) is None:
                break
            number, segment = item[0], worker.videos[item[0]].plan.segments[item[1]]
            video = worker.videos[number]
            if video.plan.staging.has(segment):
                # What an earlier attempt met while decoding a reused segment still counts.
                behind.submit(partial(stager.reuse, number, segment))
                step(segment.frames)
                continue
            if number not in temporal:
                # Items go video by video: a rank never comes back to a video it left, so the
                # blend of the one before (frames and flow: tens of MB at 1080p) goes.
                temporal.clear()
                temporal[number] = _temporal_stage(video.plan.temporal)
            try:
                _score_segment(
                    worker, number, segment, behind, stager, temporal[number], step,
                    contiguous=segment.start == last_stop.get(number),
                )
            except _VIDEO_ERRORS as err:
                behind.submit(stager.abandon)
                log.warning("rank %d: %s: %s", rank, video.plan.info.path, str(err).splitlines()[0])
                worker.note(VideoFailed(number, from_rank(err, rank) if rank else err))
                continue
            last_stop[number] = segment.stop
        behind.drain()  # raises what failed in the encoder thread
        tell()
    finally:
        # Whatever stopped the loop, the encoder thread first runs what it was given: every
        # segment scored whole is staged (a resume reuses it); the one cut short never got
        # its end, so nothing of it is written.
        behind.close()
    _log_totals(sent, behind.waited_s)
    return sent


def _score_segment(
    worker: Worker,
    number: int,
    segment: Segment,
    behind: RunBehind | RunInline,
    stager: _SegmentStager,
    temporal: TemporalStage | None,
    step: Callable[[int], None],
    contiguous: bool,
) -> None:
    """Score one segment's batches as they come from the decoder and hand them to the encoder."""
    began, waited_before = time.perf_counter(), behind.waited_s
    video = worker.videos[number]
    scorer = video.scorer
    if temporal:
        # The blend restarts with each segment, so a frame's output never depends on where a
        # rank's segments began; the meters still measure the pair across the cut.
        temporal.reset(contiguous=contiguous)
    counted, timer = Decoded(), StageTimer()
    batches = _decoded(video.plan.info, segment, scorer.batch_size, video.on_damage, counted, video.cuvid)
    decoded: Batches = ReadAhead(batches, _AHEAD_BATCHES, "mpistyle-decode") if worker.overlap else ReadInline(batches)
    try:
        behind.submit(partial(stager.begin, number, segment))
        count = 0
        met = Damage()
        for first in range(segment.start, segment.stop, scorer.batch_size):
            if first > segment.start:
                step(count)  # not after the segment's last batch: that waits for the file
            batch, met = next(decoded)
            count = len(batch)
            with timer("score"):
                styled = scorer(batch)
            if temporal:
                with timer("temporal"):
                    styled = temporal(batch, styled)
            behind.submit(partial(stager.add, styled))
    finally:
        decoded.close()
    # The decoder has counted the segment's damage by the time it handed its last frame.
    main = _MainPart(
        counted.frames,
        {"decode": decoded.busy_s, "score": timer.seconds.get("score", 0.0),
         "temporal": timer.seconds.get("temporal", 0.0),
         # How long the model waited for decoded frames, and for room behind it: near 0 when
         # the model is the bottleneck.
         "waited": decoded.waited_s + behind.waited_s - waited_before},
        0.0,
        _flicker(temporal),
    )
    behind.submit(partial(stager.end, replace(met), main))
    # Its encoder's last frames and the staging write, when they run here (no overlap), count too.
    main.total_s = time.perf_counter() - began
    # Stopping here keeps the segment: the encoder thread finishes it first.
    step(count)


@dataclass
class _MainPart:
    """What the main thread measured of a segment, for its note (``total_s`` set once the
    segment's end is handed to the encoder: read when the note is sent, in the main thread)."""

    frames_decoded: int
    seconds: dict[str, float]
    total_s: float
    flicker: RankFlicker | None


def _log_totals(sent: Sequence[SegmentDone], waited_s: float) -> None:
    scored = [s for s in sent if not s.reused]
    seconds: dict[str, float] = {}
    damage = Damage()
    for done in scored:
        damage.add(done.damage)
        for stage, spent in done.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
    reused = sum(s.frames for s in sent if s.reused)
    log.info(
        "scored %d frames of %d video(s) in %.2f s (score %.2f; in other threads: decode %.2f, encode %.2f, "
        "stage %.2f; waited %.2f)%s",
        sum(s.frames for s in scored), len({s.video for s in sent}), sum(s.total_s for s in scored),
        seconds.get("score", 0.0), seconds.get("decode", 0.0), seconds.get("encode", 0.0), seconds.get("stage", 0.0),
        seconds.get("waited", 0.0) + waited_s, f", {reused} reused from staging" if reused else "",
    )
    if damage.damaged or damage.concealed or damage.packet_errors:
        log.warning(
            # The report's words (damage.damaged, .concealed, .packet_errors), one meaning each.
            "damaged input: %d damaged frame(s) (decoded with errors, kept as FFmpeg repaired them), "
            "%d concealed frame(s) (did not decode: the frame before stands in), %d packet error(s)",
            damage.damaged, damage.concealed, damage.packet_errors,
        )


def _decoded(
    info: VideoInfo, segment: Segment, batch_size: int, on_damage: str, counted: Decoded, cuvid: Cuvid | None
) -> Iterator[tuple[np.ndarray, Damage]]:
    """The segment's frames in batches of up to ``batch_size``, each with the segment's damage
    count so far.

    The segment is decoded from its own keyframe, whichever rank does it and whatever it did
    before: FFmpeg conceals a damaged frame from the picture decoded before it, so that picture
    must not depend on the rank count.
    """
    met = Damage()
    frames = decode_segment(info, segment, on_damage, met, counted, cuvid)
    try:
        for first in range(segment.start, segment.stop, batch_size):
            batch = np.empty((min(batch_size, segment.stop - first), info.height, info.width, 3), np.uint8)
            for slot in range(len(batch)):
                batch[slot] = next(frames)
            yield batch, met
    finally:
        frames.close()


class _SegmentStager:
    """Encodes one segment at a time and stages its packets; runs in the encoder thread, and
    puts a note for each segment staged in ``done``."""

    def __init__(self, videos: Sequence[Video], rank: int) -> None:
        self._videos = videos
        self._rank = rank
        self._number = -1
        self._segment: Segment | None = None
        self._encoder: SegmentEncoder | None = None
        self._writer: SegmentWriter | None = None
        self._pts: list[int] = []
        self._timer = StageTimer()  # encode, stage: this segment's
        # Each segment staged: its note, made when the main thread sends it.
        self.done: queue.SimpleQueue[Callable[[], SegmentDone]] = queue.SimpleQueue()

    def begin(self, number: int, segment: Segment) -> None:
        self._timer = StageTimer()
        with self._timer("encode"):
            plan = self._videos[number].plan
            self._encoder = SegmentEncoder(plan.info, plan.settings, segment.start, plan.container_format)
            self._writer = plan.staging.writer(segment)
            self._number, self._segment, self._pts = number, segment, []

    def add(self, frames: np.ndarray) -> None:
        if self._encoder is None:  # the segment was abandoned
            return
        assert self._writer is not None
        with self._timer("encode"):
            self._keep(self._encoder.encode(frames))

    def end(self, damage: Damage, main: _MainPart) -> None:
        assert self._encoder is not None and self._writer is not None and self._segment is not None
        with self._timer("encode"):
            self._keep(self._encoder.finish())
            self._writer.extradata = self._encoder.extradata
            self._writer.damage = damage
        with self._timer("stage"):
            self._writer.close(complete=True)
        seconds = {**main.seconds, "encode": self._timer.seconds["encode"], "stage": self._timer.seconds["stage"]}
        number, segment, depth, rss = self._number, self._segment, reorder_depth(self._pts), peak_rss_mb()
        self.done.put(lambda: SegmentDone(
            number, self._rank, segment.number, segment.frames, False, main.frames_decoded, damage, depth, seconds,
            main.total_s, main.flicker, rss,
        ))
        self.abandon()

    def abandon(self) -> None:
        """Drop the segment under way (its video failed): nothing of it is written."""
        self._encoder = self._writer = self._segment = None

    def reuse(self, number: int, segment: Segment) -> None:
        """A segment an earlier attempt staged: noted in turn with the ones encoded here."""
        staged = self._videos[number].plan.staging.read(segment, packets=False)
        done = SegmentDone(
            number, self._rank, segment.number, segment.frames, True, 0, staged.damage, reorder_depth(staged.pts),
            {}, 0.0, None, peak_rss_mb(),
        )
        self.done.put(lambda: done)

    def _keep(self, packets: list[EncodedPacket]) -> None:
        assert self._writer is not None
        self._writer.add(packets)
        self._pts += [p.pts for p in packets]


def _temporal_stage(settings: dict[str, Any]) -> TemporalStage | None:
    """The blend and flicker meters when asked for (OpenCV is imported only then)."""
    if not (settings["alpha"] > 0 or settings["measure"]):
        return None
    from .temporal import TemporalStage

    return TemporalStage(settings["alpha"], settings["measure"], settings["flow"])


def _flicker(temporal: TemporalStage | None) -> RankFlicker | None:
    """This rank's warping-error sums (output, and the model's own frames when blending)."""
    if temporal is None or temporal.meter is None:
        return None
    own = temporal.meter_styled or temporal.meter
    return RankFlicker(temporal.meter.state(), own.state())


def _step(tick: Callable[[int], bool], frames: int) -> None:
    """Report progress; give up at this safe point if the job is stopping."""
    if not tick(frames):
        signals.check()
        raise JobStopped("stopped because another rank failed")
    signals.check()
