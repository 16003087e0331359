"""What every rank does with the segments it is handed: decode, score, blend, encode, stage.

Memory stays fixed: a few batches of frames, plus the encoder's queue and one segment's packets.
With ``overlap``, decoding runs ahead of the model and encoding plus staging behind it, each in
its own thread (:mod:`mpistyle.overlap`), so the model waits for neither; the frames go through
each stage in the same order as they do one after another, so the same bits come out.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from . import signals
from .encode import EncodedPacket, SegmentEncoder
from .errors import JobStopped
from .mux import reorder_depth
from .overlap import ReadAhead, ReadInline, RunBehind, RunInline
from .plan import Plan
from .report import RankFlicker, RankSummary, StageTimer, peak_rss_mb
from .scoring import Scorer
from .segment import Segment
from .staging import SegmentWriter, Staging
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
class Finished:
    """A segment staged (now, or by an earlier attempt of the same job), on its way to the join."""

    segment: Segment
    damage: Damage  # what decoding its frames met
    reorder_depth: int  # of its packets (mux.reorder_depth): the join's decode timestamps need it
    reused: bool  # staged by an earlier attempt


@dataclass(frozen=True)
class Worker:
    """One rank's means: the plan, its model, and its link to the root."""

    plan: Plan
    scorer: Scorer
    tick: Callable[[int], bool]  # frames done; False when the job is stopping
    take: Callable[[], Segment | None]  # the next segment to do; None when there are no more
    on_damage: str = "fail"
    overlap: bool = False
    cuvid: Cuvid | None = None  # the GPU decoder; None: the CPU's


def score_segments(worker: Worker, rank: int, host: str) -> tuple[RankSummary, list[Finished]]:
    """Decode, score, encode and stage the segments this rank is handed, one at a time, a batch
    at a time, until there are none left.

    Segments already staged by an earlier attempt of the same job are reused, whatever the
    rank count was then.
    """
    began = time.perf_counter()
    plan = worker.plan
    temporal = _temporal_stage(plan.temporal)
    timer = StageTimer()
    stager = _SegmentStager(plan)
    taken: list[Segment] = []
    reused: list[Finished] = []
    decode_s = waited_s = 0.0
    counted = Decoded()  # frames decoded, the ones before a mid-GOP segment included
    behind: RunBehind | RunInline = RunBehind(_BEHIND_BATCHES, "mpistyle-encode") if worker.overlap else RunInline()
    try:
        last_stop = -1
        while (segment := worker.take()) is not None:
            taken.append(segment)
            if plan.staging.has(segment):
                # What an earlier attempt met while decoding a reused segment still counts.
                reused.append(_reused(plan.staging, segment))
                _step(worker.tick, segment.frames)
                continue
            decoded = _decoder(worker, segment, counted)
            try:
                _score_segment(worker, segment, decoded, behind, stager, temporal, timer, contiguous=segment.start == last_stop)
            finally:
                decoded.close()
                decode_s, waited_s = decode_s + decoded.busy_s, waited_s + decoded.waited_s
            last_stop = segment.stop
        behind.drain()  # raises what failed in the encoder thread
    finally:
        # Whatever stopped the loop, the encoder thread first runs what it was given: every
        # segment scored whole is staged (a resume reuses it); the one cut short never got
        # its end, so nothing of it is written.
        behind.close()
    finished = sorted(reused + stager.finished, key=lambda f: f.segment.number)
    seconds = {
        "decode": decode_s, "score": timer.seconds.get("score", 0.0), "temporal": timer.seconds.get("temporal", 0.0),
        "encode": stager.timer.seconds.get("encode", 0.0), "stage": stager.timer.seconds.get("stage", 0.0),
        # How long the model waited for decoded frames, and for room behind it (or for the
        # last segments to be staged): near 0 when the model is the bottleneck.
        "waited": waited_s + behind.waited_s,
    }
    summary = _summary(worker, taken, finished, seconds, time.perf_counter() - began, temporal, rank, host, counted.frames)
    _log_summary(summary)
    return summary, finished


def _decoder(worker: Worker, segment: Segment, counted: Decoded) -> Batches:
    """The segment's frames in batches: decoded ahead in a thread with ``overlap``."""
    batches = _decoded(worker.plan.info, segment, worker.scorer.batch_size, worker.on_damage, counted, worker.cuvid)
    return ReadAhead(batches, _AHEAD_BATCHES, "mpistyle-decode") if worker.overlap else ReadInline(batches)


def _score_segment(
    worker: Worker,
    segment: Segment,
    decoded: Batches,
    behind: RunBehind | RunInline,
    stager: _SegmentStager,
    temporal: TemporalStage | None,
    timer: StageTimer,
    contiguous: bool,
) -> None:
    """Score one segment's batches as they come from the decoder and hand them to the encoder."""
    if temporal:
        # The blend restarts with each segment, so a frame's output never depends on where a
        # rank's segments began; the meters still measure the pair across the cut.
        temporal.reset(contiguous=contiguous)
    behind.submit(partial(stager.begin, segment))
    count = 0
    met = Damage()
    for first in range(segment.start, segment.stop, worker.scorer.batch_size):
        if first > segment.start:
            _step(worker.tick, count)  # not after the segment's last batch: that waits for the file
        batch, met = next(decoded)
        count = len(batch)
        with timer("score"):
            styled = worker.scorer(batch)
        if temporal:
            with timer("temporal"):
                styled = temporal(batch, styled)
        behind.submit(partial(stager.add, styled))
    # The decoder has counted the segment's damage by the time it handed its last frame.
    behind.submit(partial(stager.end, replace(met)))
    # Stopping here keeps the segment: the encoder thread finishes it first.
    _step(worker.tick, count)


def _reused(staging: Staging, segment: Segment) -> Finished:
    staged = staging.read(segment, packets=False)
    return Finished(segment, staged.damage, reorder_depth(staged.pts), reused=True)


def _summary(
    worker: Worker,
    segments: Sequence[Segment],  # the ones it was handed, in order
    finished: Sequence[Finished],
    seconds: dict[str, float],
    total: float,
    temporal: TemporalStage | None,
    rank: int,
    host: str,
    frames_decoded: int,
) -> RankSummary:
    device = worker.scorer.device
    frames = sum(s.frames for s in segments)
    scored = frames - sum(f.segment.frames for f in finished if f.reused)
    damage = Damage()
    for done in finished:
        damage.add(done.damage)
    return RankSummary(
        rank=rank,
        host=host,
        device=str(device),
        threads=worker.scorer.threads if device.type == "cpu" else None,
        precision=worker.scorer.precision,
        compiled=worker.scorer.compiled,
        overlap=worker.overlap,
        decoder=worker.cuvid.name if worker.cuvid else worker.plan.info.codec,
        encoder=worker.plan.settings.codec,
        frames=frames,
        segments=[s.number for s in segments],
        frames_reused=frames - scored,
        frames_decoded=frames_decoded,
        damage=damage,
        seconds=seconds,
        seconds_total=total,
        peak_rss_mb=peak_rss_mb(),
        flicker=_flicker(temporal),
        fps=scored / total if total > 0 and scored > 0 else None,
    )


def _log_summary(summary: RankSummary) -> None:
    seconds, damage = summary.seconds, summary.damage
    reused = summary.frames_reused
    log.info(
        "scored %d frames in %.2f s (score %.2f; in other threads: decode %.2f, encode %.2f, stage %.2f; waited %.2f)%s",
        summary.frames - reused, summary.seconds_total, seconds["score"], seconds["decode"], seconds["encode"],
        seconds["stage"], seconds["waited"], f", {reused} reused from staging" if reused else "",
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
    """Encodes one segment at a time and stages its packets; runs in the encoder thread."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._segment: Segment | None = None
        self._encoder: SegmentEncoder | None = None
        self._writer: SegmentWriter | None = None
        self._pts: list[int] = []
        self.timer = StageTimer()  # encode, stage: this thread's own
        self.finished: list[Finished] = []

    def begin(self, segment: Segment) -> None:
        with self.timer("encode"):
            plan = self._plan
            self._encoder = SegmentEncoder(plan.info, plan.settings, segment.start, plan.container_format)
            self._writer = plan.staging.writer(segment)
            self._segment, self._pts = segment, []

    def add(self, frames: np.ndarray) -> None:
        assert self._encoder is not None and self._writer is not None
        with self.timer("encode"):
            self._keep(self._encoder.encode(frames))

    def end(self, damage: Damage) -> None:
        assert self._encoder is not None and self._writer is not None and self._segment is not None
        with self.timer("encode"):
            self._keep(self._encoder.finish())
            self._writer.extradata = self._encoder.extradata
            self._writer.damage = damage
        with self.timer("stage"):
            self._writer.close(complete=True)
        self.finished.append(Finished(self._segment, damage, reorder_depth(self._pts), reused=False))
        self._encoder = self._writer = self._segment = None

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
