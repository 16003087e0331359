"""The staging area: stylised frames on a filesystem every rank and the root can see (NFS on a
cluster), between scoring and encoding.

Layout: ``<root>/<job key>/frames-<start>-<stop>.h5``, one HDF5 file per GOP of the input, with
one dataset ``frames`` of shape ``(n, H, W, 3)`` uint8, chunked one frame per chunk so the root
can stream it back frame by frame. Each rank writes only the files of its own GOPs, so the serial h5py
wheel suffices (no parallel HDF5 build, no MPI-IO locking on NFS). A file is written under a
temporary name and renamed once complete: a crash never leaves a file that looks finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import StagingError

DEFAULT_STAGING = ".mpistyle-staging"


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a file's contents, cheaply: path, size, mtime and a hash of its first
    and last MiB (reading a whole multi-GB video just to name a directory would be too slow)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if stat.st_size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read())
    return {"path": str(path.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail": digest.hexdigest()}


def job_key(parts: dict[str, Any]) -> str:
    """A short stable name for one (input, model, geometry) combination."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Staging:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key

    def create(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StagingError(f"cannot create staging directory {self.dir}: {err.strerror}") from None
        if not os.access(self.dir, os.W_OK):
            raise StagingError(f"staging directory is not writable: {self.dir}")

    def shard_path(self, start: int, stop: int) -> Path:
        return self.dir / f"frames-{start:09d}-{stop:09d}.h5"

    def has(self, start: int, stop: int) -> bool:
        """Whether frames ``[start, stop)`` are staged completely (partial files never count)."""
        return self.shard_path(start, stop).is_file()

    def writer(self, start: int, stop: int, height: int, width: int) -> ShardWriter:
        return ShardWriter(self.shard_path(start, stop), stop - start, height, width)

    def read(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Frames of one finished shard, one at a time (a single chunk in memory)."""
        path = self.shard_path(start, stop)
        try:
            with h5py.File(path, "r", locking=False) as handle:
                frames = handle["frames"]
                if frames.shape[0] != stop - start:
                    raise StagingError(f"staged file {path} holds {frames.shape[0]} frames, expected {stop - start}")
                for index in range(frames.shape[0]):
                    yield frames[index]
        except OSError as err:
            raise StagingError(f"cannot read staged frames {path}: {err}") from None

    def remove(self, remove_empty_root: bool = False) -> None:
        """Delete this job's staged frames; also the root folder if asked and nothing else is there."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if remove_empty_root:
            try:
                self.dir.parent.rmdir()
            except OSError:
                pass  # another job's frames are staged there too


# Room for HDF5's superblock, object headers and chunk index beyond the frames themselves.
_HDF5_OVERHEAD = 1 << 16


class ShardWriter:
    """Appends frames to one shard; renames it into place only when every frame is in."""

    def __init__(self, path: Path, frames: int, height: int, width: int) -> None:
        self.path = path
        # Per host and process: two attempts at the same job never write into each other's file.
        self.partial = path.with_name(f"{path.name}.partial-{socket.gethostname()}-{os.getpid()}")
        self.expected = frames
        self.count = 0
        try:
            self._file = h5py.File(self.partial, "w", locking=False)
            # One chunk per frame, no compression: writes and the root's reads stay one memcpy.
            self._data = self._file.create_dataset(
                "frames", shape=(frames, height, width, 3), dtype=np.uint8, chunks=(1, height, width, 3)
            )
            # Reserve the whole file now: a full disk (or a file-size limit) fails here, cleanly,
            # instead of inside HDF5's writes, which it does not survive (it can crash on close).
            os.posix_fallocate(self._file.id.get_vfd_handle(), 0, frames * height * width * 3 + _HDF5_OVERHEAD)
        except OSError as err:
            if hasattr(self, "_file"):
                self.close(complete=False, quiet=True)
            self.partial.unlink(missing_ok=True)
            raise _staging_error(self.partial, err) from None

    def write(self, batch: np.ndarray) -> None:
        try:
            self._data[self.count : self.count + len(batch)] = batch
        except OSError as err:
            raise _staging_error(self.partial, err) from None
        self.count += len(batch)

    def close(self, complete: bool, quiet: bool = False) -> None:
        # Drop the dataset before the file: HDF5 crashes closing a dataset whose file already
        # failed to close.
        self._data = None
        try:
            self._file.close()
        except OSError as err:
            self.partial.unlink(missing_ok=True)
            if quiet:
                return
            raise _staging_error(self.partial, err) from None
        if complete and self.count == self.expected:
            # On disk before it is named finished: after a crash a finished name holds all frames.
            with self.partial.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(complete=exc_type is None)


def _staging_error(path: Path, err: OSError) -> StagingError:
    text = str(err)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "No space left" in text or "file too large" in text.lower():
        return StagingError(f"staging filesystem is full while writing {path}: free space or set staging.root")
    return StagingError(f"cannot write staged frames {path}: {text}")
