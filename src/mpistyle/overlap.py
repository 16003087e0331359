"""Decoding ahead of the model and encoding behind it, each in its own thread, so a rank's
accelerator never waits for the CPU work around it (PyAV and x264 release the GIL); or, where
the model itself needs every core, the same steps one after another in the caller's thread.

Both keep their order and hold a few items at most: what runs in them, and so the output, is
the same either way; only when it runs changes.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_S = 0.1  # how often a blocked thread looks whether it was closed


class ReadAhead(Generic[T]):
    """Runs an iterator in a thread, at most ``depth`` items ahead of whoever iterates over this.

    An error raised by the iterator is raised here, by the ``next`` that would have returned
    the item, with its own type. :meth:`close` stops the thread and closes the iterator there
    (a generator's ``finally`` and ``with`` blocks run).
    """

    def __init__(self, items: Iterator[T], depth: int, name: str) -> None:
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self.busy_s = 0.0  # time the thread spent producing items
        self.waited_s = 0.0  # time the consumer waited for them
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._closed.is_set():
                mark = time.perf_counter()
                try:
                    item = next(self._items)
                except StopIteration:
                    self._put(_DONE)
                    return
                except BaseException as err:  # handed to the consumer, raised there
                    self._put(_Failed(err))
                    return
                finally:
                    self.busy_s += time.perf_counter() - mark
                self._put(item)
        finally:
            _close(self._items)

    def _put(self, item: Any) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        mark = time.perf_counter()
        item = self._queue.get()
        self.waited_s += time.perf_counter() - mark
        if item is _DONE:
            self._queue.put(_DONE)  # iterating again still ends
            raise StopIteration
        if isinstance(item, _Failed):
            self._queue.put(item)
            raise item.error
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


class RunBehind:
    """Runs calls in order in one thread, at most ``depth`` of them waiting, and hands their
    errors back: the first call that fails is raised by the next :meth:`submit` or
    :meth:`drain`, and the calls after it are skipped."""

    def __init__(self, depth: int, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed = False  # set by the thread: it skips every call after a failed one
        self.waited_s = 0.0  # time the submitter spent waiting for room, or for the calls to end
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is _DONE:
                return
            if isinstance(call, threading.Event):
                call.set()  # drain(): everything before it has run
                continue
            if not self._failed:
                try:
                    call()
                except BaseException as err:  # raised in the submitter
                    self._error, self._failed = err, True

    @property
    def failed(self) -> bool:
        """Whether a call has failed (its error not necessarily raised yet)."""
        return self._failed

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, call: Callable[[], object]) -> None:
        self._raise()
        mark = time.perf_counter()
        self._queue.put(call)
        self.waited_s += time.perf_counter() - mark

    def drain(self) -> None:
        """Wait until every call submitted so far has run; raise the first error among them."""
        done = threading.Event()
        mark = time.perf_counter()
        self._queue.put(done)
        done.wait()
        self.waited_s += time.perf_counter() - mark
        self._raise()

    def close(self) -> None:
        """Stop the thread once the calls submitted so far have run (or been skipped)."""
        self._queue.put(_DONE)
        self._thread.join()


class ReadInline(Generic[T]):
    """:class:`ReadAhead`'s interface, run in the caller's thread: each item is made when asked for."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self.busy_s = 0.0

    @property
    def waited_s(self) -> float:
        return self.busy_s  # the caller waits for every item while it is made

    def __iter__(self) -> ReadInline[T]:
        return self

    def __next__(self) -> T:
        mark = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.busy_s += time.perf_counter() - mark

    def close(self) -> None:
        _close(self._items)


class RunInline:
    """:class:`RunBehind`'s interface, run in the caller's thread: each call runs when submitted."""

    def __init__(self) -> None:
        self.waited_s = 0.0

    def submit(self, call: Callable[[], object]) -> None:
        mark = time.perf_counter()
        try:
            call()
        finally:
            self.waited_s += time.perf_counter() - mark

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _close(items: Iterator[Any]) -> None:
    """Close a generator (its ``finally`` and ``with`` blocks run); other iterators need nothing."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error
