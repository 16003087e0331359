"""mpistyle.overlap: the decode-ahead and encode-behind threads keep order, bound what they
hold, and hand every error back to the scoring loop with its own type."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mpistyle.errors import InputError, StagingError
from mpistyle.overlap import ReadAhead, RunBehind


def test_ahead_yields_every_item_in_order_and_ends() -> None:
    ahead = ReadAhead(iter(range(100)), depth=3, name="t")
    assert list(ahead) == list(range(100))
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()


def test_ahead_holds_at_most_depth_items_beyond_the_consumer() -> None:
    produced = []

    def items() -> Iterator[int]:
        for n in range(50):
            produced.append(n)
            yield n

    ahead = ReadAhead(items(), depth=2, name="t")
    assert next(ahead) == 0
    time.sleep(0.3)
    # Item 0 taken, 2 queued, and at most one more made and waiting to be queued.
    assert len(produced) <= 4
    ahead.close()


def test_ahead_raises_the_iterators_error_in_the_consumer_with_its_type() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise InputError("frame 2 is corrupt")

    ahead = ReadAhead(items(), depth=2, name="t")
    assert next(ahead) == 1
    with pytest.raises(InputError, match="frame 2 is corrupt"):
        next(ahead)
    with pytest.raises(InputError):  # and again: it never pretends the items went on
        next(ahead)
    ahead.close()


def test_closing_ahead_early_closes_the_generator_in_its_thread() -> None:
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    ahead = ReadAhead(items(), depth=2, name="t")
    assert next(ahead) == 0
    ahead.close()
    assert closed.is_set()


def test_behind_runs_calls_in_order_and_drain_waits_for_them() -> None:
    done: list[int] = []
    behind = RunBehind(depth=2, name="t")
    for n in range(20):
        behind.submit(lambda n=n: (time.sleep(0.001), done.append(n)))
    behind.drain()
    assert done == list(range(20))
    behind.close()


def test_behind_hands_back_the_first_error_and_skips_the_calls_after_it() -> None:
    ran: list[str] = []

    def fail() -> None:
        raise StagingError("staging filesystem is full")

    behind = RunBehind(depth=8, name="t")
    behind.submit(lambda: ran.append("a"))
    behind.submit(fail)
    behind.submit(lambda: ran.append("c"))  # may be queued before the failure is known
    with pytest.raises(StagingError, match="full"):
        behind.drain()
    behind.submit(lambda: ran.append("d"))
    behind.drain()
    assert ran == ["a"]
    behind.close()


def test_behind_blocks_the_submitter_when_depth_calls_wait() -> None:
    release = threading.Event()
    behind = RunBehind(depth=1, name="t")
    behind.submit(release.wait)  # running
    behind.submit(lambda: None)  # waiting: the queue is full
    submitted = threading.Event()
    threading.Thread(target=lambda: (behind.submit(lambda: None), submitted.set()), daemon=True).start()
    assert not submitted.wait(0.3)
    release.set()
    assert submitted.wait(5)
    behind.drain()
    behind.close()
