"""File habits every program keeps: a file appears whole or not at all, and a folder is checked
before any work that would be lost if it could not be written."""
from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MpistyleError, OutputError, StagingError


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it (one filesystem, so
    the rename is atomic), hidden, and per host and process, so two writers never share one."""
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


@contextmanager
def replacing(path: Path, durable: bool = False, ready: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a partial path to write; when the block completes, rename it over ``path``, after
    an fsync if ``durable`` (on NFS a rename can reach the server before the data). ``ready``
    is called with the complete partial file just before the rename (the rename keeps its size
    and modification time: a record of them holds once the file is in place, and never for
    what was there before). If the block fails, the partial file is removed and ``path`` is
    left as it was. OSError passes through for the caller to word."""
    partial = partial_path(path)
    try:
        yield partial
        if durable:
            with partial.open("rb") as handle:
                os.fsync(handle.fileno())
        if ready is not None:
            ready(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    try:
        with replacing(path, durable) as partial:
            partial.write_bytes(data)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror}") from None


def writable_dir(directory: Path, what: str, error: type[MpistyleError] = OutputError, create: bool = True) -> None:
    """Check that this process can write in ``directory`` (created first if ``create``), or
    raise ``error`` naming it as ``what``."""
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise error(f"cannot create the {what} {directory}: {err.strerror}") from None
    elif not directory.is_dir():
        raise error(f"the {what} {directory} does not exist: create it or choose another place")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error(f"the {what} is not writable: {directory}")
    try:  # access() trusts the mode bits; a read-only mount, /proc or a full quota only show on a write
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise error(f"cannot write in the {what} {directory}: {err.strerror}") from None


def same_file(a: Path, b: Path) -> bool:
    """Whether writing ``a`` would write over ``b``: one file under two names (links and other
    spellings included), or, where either does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.expanduser().resolve() == b.expanduser().resolve()


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a file: its size and the SHA-256 of all its bytes.

    Contents only, never the path or the modification time: a copy of the same input (a
    watcher's re-download, a file moved to another folder) must find the segments staged for
    it, and an input edited in place must not. Hashing reads the file once (about 1.4 GB/s
    from cache on the 2-core dev machine), which the decode reads again anyway.
    """
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as err:
        raise StagingError(f"cannot read {path} to fingerprint its contents: {err.strerror}") from None
    return {"size": path.stat().st_size, "sha256": digest}
