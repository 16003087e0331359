"""Root: the job's one queue of (video, segment) items, and each video's delivery.

Items go out video by video, each video's segments longest first, to whichever rank asks next
(:meth:`parallel.RankContext.run_everywhere`): a rank done with one video's last segments takes
the next video's first, so no rank waits while any video has work left. The ranks tell the root
each segment they stage (:class:`report.SegmentDone`); the moment a video's last segment is
staged, it is delivered (joined, previewed, reported: ``finish``) in a thread of the root's own,
while the ranks, the root included, go on scoring the videos after it. A video whose input fails
(:class:`worker.VideoFailed`) hands out no more of its items and fails alone.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from .errors import ConfigError, InputError, ModelError, MpistyleError, OutputError
from .overlap import RunBehind
from .report import RankSummary, SegmentDone, rank_summary
from .segment import largest_first
from .worker import Video, VideoFailed

log = logging.getLogger(__name__)

# A video's outcome: its job report, or why it failed.
Outcome = dict[str, Any] | MpistyleError
# finish(video, per-rank summaries, its staged segments, seconds from its first item handed out
# to its last segment staged) -> its job report.
Finish = Callable[[int, list[RankSummary], list[SegmentDone], float], dict[str, Any]]
# What fails a video alone while it is delivered: where its output goes, or the input read for
# its preview. Anything else (staging, a stop, a bug) ends the job.
_PER_VIDEO = (ConfigError, InputError, OutputError, ModelError)


class Deliveries:
    """The root's side of the queue: what goes out, what came back, what is delivered."""

    def __init__(
        self,
        videos: Sequence[Video],
        finish: Finish,
        on_outcome: Callable[[int, Outcome], None] | None = None,
        on_first_item: Callable[[int], None] | None = None,
    ) -> None:
        self._videos = videos
        self._finish = finish
        self._on_outcome = on_outcome
        self._on_first_item = on_first_item
        self._staged: list[list[SegmentDone]] = [[] for _ in videos]
        self._left = [{s.number for s in video.plan.segments} for video in videos]
        self._handed_at: dict[int, float] = {}
        self._fatal: BaseException | None = None  # a delivery's error that ends the job
        self.outcomes: dict[int, Outcome] = {}
        # Never full: a note must not wait for a delivery (the other ranks would wait for the root).
        self._behind = RunBehind(len(videos) + 1, "mpistyle-deliver")

    def items(self) -> Iterator[tuple[int, int]]:
        """(video, segment number), video by video, each video's longest segments first; the
        rest of a video that failed is skipped, and nothing more goes out once a delivery failed
        in a way that ends the job (the ranks finish what they hold)."""
        for number, video in enumerate(self._videos):
            for segment in largest_first(video.plan.segments):
                if self._fatal is not None or self._behind.failed:
                    return
                if number in self.outcomes:
                    break
                if number not in self._handed_at:
                    self._handed_at[number] = time.perf_counter()
                    if self._on_first_item:
                        self._on_first_item(number)
                yield number, segment.number

    def note(self, rank: int, message: SegmentDone | VideoFailed) -> None:
        """A rank's note (the root's own included), in the order that rank sent them. Never
        raises: the root may be past its own work, answering the others, when it is called."""
        del rank  # each note names its rank
        number = message.video
        if number in self.outcomes:
            return  # a failed video's segments still being staged by other ranks
        if isinstance(message, VideoFailed):
            self._done(number, message.error)
            return
        self._staged[number].append(message)
        self._left[number].discard(message.number)
        if not self._left[number]:
            seconds = time.perf_counter() - self._handed_at[number]
            try:
                self._behind.submit(partial(self._deliver, number, seconds))
            except BaseException as err:  # an earlier delivery's: raised by close, once the ranks are done
                self._fatal = self._fatal or err

    def close(self) -> dict[int, Outcome]:
        """Wait for the deliveries under way; every video's outcome so far (a video neither
        done nor failed is missing: the job stopped before its end). Raises a delivery's
        error that ends the job."""
        try:
            self._behind.drain()
        finally:
            self._behind.close()
        if self._fatal is not None:
            raise self._fatal
        return dict(self.outcomes)

    def _deliver(self, number: int, score_s: float) -> None:
        """In the delivery thread: join, preview and report one video."""
        video = self._videos[number]
        staged = self._staged[number]
        summaries = [rank_summary(facts, [s for s in staged if s.rank == facts.rank]) for facts in video.ranks]
        try:
            outcome: Outcome = self._finish(number, summaries, staged, score_s)
        except _PER_VIDEO as err:
            log.warning("%s: %s", video.plan.output, str(err).splitlines()[0])
            outcome = err
        self._done(number, outcome)

    def _done(self, number: int, outcome: Outcome) -> None:
        self.outcomes[number] = outcome
        if self._on_outcome:
            try:
                self._on_outcome(number, outcome)
            except BaseException as err:  # a bug in the callback ends the job, raised by close
                self._fatal = self._fatal or err
