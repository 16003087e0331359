"""The project's exceptions. Each carries the process exit code the CLI returns for it.

Exit codes (documented in README.md):
  1  unexpected internal error (a bug: the traceback is logged)
  2  bad configuration or command-line override, or a batch the device has no memory for
  3  input missing, unreadable, or not a usable video
  4  output location unusable (unwritable directory, output equals input, ...)
  5  model or checkpoint problem (checksum, shape mismatch, unknown style)
  6  staging area problem (disk full, unwritable, corrupt staged frames)
  9  blob storage or job scheduler problem that retries did not cure (mpistyle-watch)
  10 a video is stuck (mpistyle-watch status: mpistyle.watch.status.STUCK_EXIT)
  128+N  stopped by signal N (143: SIGTERM, e.g. scancel or preemption; 130: Ctrl-C)
"""
from __future__ import annotations


class MpistyleError(Exception):
    """Base of every error a user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1
    # Raised by the checks before any work (settings, input, output, model, staging): the job
    # did nothing, so its run directory holds nothing but this message (cli removes a new one).
    before_work = False


class InternalError(MpistyleError):
    """A bug, reported with its traceback."""

    exit_code = 1


class ConfigError(MpistyleError):
    exit_code = 2


class InputError(MpistyleError):
    exit_code = 3


class OutputError(MpistyleError):
    exit_code = 4


class ModelError(MpistyleError):
    exit_code = 5


class StagingError(MpistyleError):
    exit_code = 6


class SomeVideosFailed(MpistyleError):
    """A batch (``inputs=``) finished; some of its videos could not be done (the batch report
    and each one's error file say why)."""

    exit_code = 8


class StorageError(MpistyleError):
    """Storage or scheduler calls that failed for good after retries, or an unusable name."""

    exit_code = 9


class JobAborted(MpistyleError):
    exit_code = 7


class JobInterrupted(JobAborted):
    """A stop signal arrived (scancel, preemption, Ctrl-C); exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.exit_code))


class JobStopped(JobAborted):
    """This rank gave up its work because another rank failed."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
