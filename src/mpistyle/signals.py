"""SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 turn into a cooperative stop: the job checks :func:`check` between batches
(and between frames while encoding), so every rank leaves the MPI protocol at a safe point,
finished segments stay staged for a re-run, and no partial output is left. A second signal ends
the process at once, the default way.

Slurm sends SIGTERM on ``scancel`` and before a preemption kill; slurm/style.sbatch forwards
its time-limit warning as SIGUSR1 (srun and mpirun pass SIGUSR1 on to every rank, while srun
answers a SIGTERM of its own by killing the step outright).
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import JobInterrupted

_received: int | None = None
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def install() -> None:
    for signum in _STOPS:
        signal.signal(signum, _note)


@contextmanager
def held() -> Iterator[None]:
    """Stop signals arriving in the block wait for its end: for steps that must happen together
    (an output renamed into place and the record that it was delivered), which a second signal,
    ending the process at once, would otherwise split."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed from the main thread
        return
    waiting: list[int] = []
    previous = {stop: signal.signal(stop, lambda signum, frame: waiting.append(signum)) for stop in _STOPS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, signal.SIG_DFL if handler is None else handler)
        for signum in waiting:
            os.kill(os.getpid(), signum)  # now, to whatever handles it after the block


def _note(signum: int, frame: FrameType | None) -> None:
    global _received
    del frame
    _received = signum
    signal.signal(signum, signal.SIG_DFL)


def check() -> None:
    """Raise :class:`JobInterrupted` if a stop signal has arrived."""
    if _received is not None:
        name = signal.Signals(_received).name
        raise JobInterrupted(
            f"stopped by {name}: finished segments stay staged, run the same command again to resume",
            exit_code=128 + _received,
        )
