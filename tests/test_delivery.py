"""The root's queue (delivery.Deliveries) on its own: what goes out, and what a failure stops,
with real plans of real videos and a real delivery thread; the ranks' side runs under mpirun in
tests/test_batch.py."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from mpistyle.delivery import Deliveries
from mpistyle.errors import InputError, OutputError, StagingError
from mpistyle.plan import make_plan
from mpistyle.report import RankFacts, SegmentDone
from mpistyle.video import Damage
from mpistyle.worker import Video, VideoFailed

Cfg = Callable[..., DictConfig]


def _videos(video: Callable[..., Path], cfg: Cfg, tmp_path: Path, count: int) -> list[Video]:
    facts = (RankFacts(0, "here", "cpu", 1, "fp32", False, False, "h264", "libx264", 1),)
    plans = [
        make_plan(cfg(f"input={video(f'v{n}.mp4', frames=24, gop=6, start=24 * n)}", f"output={tmp_path / f'out{n}.mp4'}",
                      "video.segment_seconds=1"))
        for n in range(count)
    ]
    return [Video(plan, None, facts) for plan in plans]  # type: ignore[arg-type]  # no model: nothing is scored here


def _staged(number: int, segment: int) -> SegmentDone:
    return SegmentDone(number, 0, segment, 12, False, 12, Damage(), 2, {}, 0.1, None, 1.0)


def test_items_go_video_by_video_longest_first_and_each_video_is_delivered_once_whole(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    videos = _videos(video, cfg, tmp_path, 3)
    delivered: list[tuple[int, list[int]]] = []
    ended: list[int] = []

    def finish(number: int, summaries: list[Any], staged: list[SegmentDone], seconds: float) -> dict[str, Any]:
        assert threading.current_thread() is not threading.main_thread()  # beside the root's scoring
        assert [s.frames for s in summaries] == [24] and seconds >= 0
        delivered.append((number, sorted(s.number for s in staged)))
        return {"video": number}

    deliveries = Deliveries(videos, finish, lambda number, outcome: ended.append(number))
    items = list(deliveries.items())
    assert items == [(v, s) for v in range(3) for s in (0, 1)]  # 2 segments of 12 frames each
    for number, segment in reversed(items):  # staged in any order, by any rank
        deliveries.note(0, _staged(number, segment))
    outcomes = deliveries.close()
    assert sorted(delivered) == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1])]
    assert outcomes == {n: {"video": n} for n in range(3)} and sorted(ended) == [0, 1, 2]


def test_a_failed_video_hands_out_no_more_and_a_failed_delivery_fails_that_video_alone(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    videos = _videos(video, cfg, tmp_path, 3)

    def finish(number: int, summaries: list[Any], staged: list[SegmentDone], seconds: float) -> dict[str, Any]:
        if number == 2:
            raise OutputError("cannot write out2.mp4: No space left on device")
        return {"video": number}

    deliveries = Deliveries(videos, finish)
    items = deliveries.items()
    assert next(items) == (0, 0)
    deliveries.note(1, VideoFailed(0, InputError("rank 1: input is damaged")))
    deliveries.note(0, _staged(0, 0))  # another rank's segment of the failed video: dropped
    assert next(items) == (1, 0)  # video 0's second segment never goes out
    for number, segment in ((1, 1), (2, 0), (2, 1)):
        assert next(items) == (number, segment)
    for number, segment in ((1, 0), (1, 1), (2, 0), (2, 1)):
        deliveries.note(0, _staged(number, segment))
    outcomes = deliveries.close()
    assert isinstance(outcomes[0], InputError) and isinstance(outcomes[2], OutputError)
    assert outcomes[1] == {"video": 1}


def test_a_delivery_error_that_ends_the_job_stops_the_handout_and_is_raised_at_the_end(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    videos = _videos(video, cfg, tmp_path, 3)
    failed = threading.Event()

    def finish(number: int, summaries: list[Any], staged: list[SegmentDone], seconds: float) -> dict[str, Any]:
        failed.set()
        raise StagingError("cannot read staged segment: gone")

    deliveries = Deliveries(videos, finish)
    items = deliveries.items()
    assert [next(items), next(items)] == [(0, 0), (0, 1)]
    deliveries.note(0, _staged(0, 0))
    deliveries.note(0, _staged(0, 1))  # video 0 complete: its delivery fails
    assert failed.wait(10)
    deadline = time.monotonic() + 10
    while not deliveries._behind.failed:  # the thread records the failure as the call returns
        assert time.monotonic() < deadline
        time.sleep(0.01)
    deliveries.note(0, _staged(1, 0))  # notes never raise: the root may be answering other ranks
    assert list(items) == []  # the ranks get no more work and finish
    with pytest.raises(StagingError, match="gone"):
        deliveries.close()
