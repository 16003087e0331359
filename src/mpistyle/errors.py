"""The project's exceptions. Each carries the process exit code the CLI returns for it.

Exit codes (documented in README.md):
  1  unexpected internal error (a bug: the traceback is logged)
  2  bad configuration or command-line override
  3  input missing, unreadable, or not a usable video
  4  output location unusable (unwritable directory, output equals input, ...)
  5  model or checkpoint problem (checksum, shape mismatch, unknown style)
  6  staging area problem (disk full, unwritable, corrupt staged frames)
  7  another rank failed or the job was interrupted
"""
from __future__ import annotations


class MpistyleError(Exception):
    """Base of every error a user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


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


class JobAborted(MpistyleError):
    exit_code = 7


class JobStopped(JobAborted):
    """This rank gave up its work because another rank failed."""
