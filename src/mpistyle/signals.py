"""SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 turn into a cooperative stop: the job checks :func:`check` between batches
(and between frames while encoding), so every rank leaves the MPI protocol at a safe point,
finished segments stay staged for a re-run, and no partial output is left. A second signal ends
the process at once, the default way.

Slurm sends SIGTERM on ``scancel`` and before a preemption kill; slurm/style.sbatch forwards
its time-limit warning as SIGUSR1 (srun and mpirun pass SIGUSR1 on to every rank, while srun
answers a SIGTERM of its own by killing the step outright).
"""
from __future__ import annotations

import signal
from types import FrameType

from .errors import JobInterrupted

_received: int | None = None
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def install() -> None:
    for signum in _STOPS:
        signal.signal(signum, _note)


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
