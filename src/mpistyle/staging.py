"""The staging area: each segment's encoded frames on a filesystem every rank and the root can
see (NFS on a cluster), between scoring and the root's join.

Layout: ``<root>/<job key>/segment-<start>-<stop>.h5``, one HDF5 file per segment (whole GOPs of
the input, frames ``[start, stop)``), holding the segment's compressed packets in decode order:
``data`` (all packets' bytes, uint8), ``offsets`` (n + 1 int64: packet i is
``data[offsets[i]:offsets[i + 1]]``), ``pts`` (int64, the input's time base; the root makes
the decode timestamps anew when joining),
``keyframe`` (bool), the codec headers ``extradata`` (uint8), and in the attribute ``damage``
what decoding the segment's input met (so a resumed job still reports it). Encoded frames are
about a hundredth of raw ones, so the shared filesystem and the root's reads stay far from
saturation (bench/SCALING.md).

Each rank writes only the files of its own segments, so the serial h5py wheel suffices (no
parallel HDF5 build, no MPI-IO locking on NFS). A file is written under a temporary name and
renamed once complete: a crash never leaves a file that looks finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import StagingError
from .video import EncodedPacket

DEFAULT_STAGING = ".mpistyle-staging"


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
        raise StagingError(f"cannot read {path} to name its staging directory: {err.strerror}") from None
    return {"size": path.stat().st_size, "sha256": digest}


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

    def segment_path(self, start: int, stop: int) -> Path:
        return self.dir / f"segment-{start:09d}-{stop:09d}.h5"

    def has(self, start: int, stop: int) -> bool:
        """Whether frames ``[start, stop)`` are staged completely (partial files never count)."""
        return self.segment_path(start, stop).is_file()

    def writer(self, start: int, stop: int) -> SegmentWriter:
        return SegmentWriter(self.segment_path(start, stop), stop - start)

    def read(self, start: int, stop: int) -> tuple[list[EncodedPacket], bytes]:
        """The packets (decode order) and codec headers of one finished segment."""
        path = self.segment_path(start, stop)
        try:
            with h5py.File(path, "r", locking=False) as handle:
                data = handle["data"][:].tobytes()
                offsets, pts, keyframe = (handle[name][:] for name in ("offsets", "pts", "keyframe"))
                extradata = handle["extradata"][:].tobytes()
        except (OSError, KeyError) as err:
            raise StagingError(f"cannot read staged segment {path}: {err}") from None
        if len(pts) != stop - start or len(offsets) != len(pts) + 1:
            raise StagingError(f"staged segment {path} holds {len(pts)} frames, expected {stop - start}")
        packets = [
            EncodedPacket(data[offsets[i] : offsets[i + 1]], int(pts[i]), bool(keyframe[i]))
            for i in range(len(pts))
        ]
        return packets, extradata

    def damage(self, start: int, stop: int) -> dict[str, int]:
        """What decoding one finished segment's frames met (counts of video.Damage)."""
        path = self.segment_path(start, stop)
        try:
            with h5py.File(path, "r", locking=False) as handle:
                return json.loads(handle.attrs.get("damage", "{}"))
        except (OSError, ValueError) as err:
            raise StagingError(f"cannot read staged segment {path}: {err}") from None

    def decode_order_pts(self, start: int, stop: int) -> list[int]:
        """The pts of one finished segment's packets, in decode order (without the packets)."""
        path = self.segment_path(start, stop)
        try:
            with h5py.File(path, "r", locking=False) as handle:
                return [int(pts) for pts in handle["pts"][:]]
        except (OSError, KeyError) as err:
            raise StagingError(f"cannot read staged segment {path}: {err}") from None

    def remove(self, remove_empty_root: bool = False) -> None:
        """Delete this job's staged frames; also the root folder if asked and nothing else is there."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if remove_empty_root:
            try:
                self.dir.parent.rmdir()
            except OSError:
                pass  # another job's frames are staged there too


# Room for HDF5's superblock, object headers and dataset indexes beyond the packets themselves.
_HDF5_OVERHEAD = 1 << 16


class SegmentWriter:
    """Collects one segment's packets, then writes them in one go and renames the file into
    place, only when the segment is complete."""

    def __init__(self, path: Path, frames: int) -> None:
        self.path = path
        # Per host and process: two attempts at the same job never write into each other's file.
        self.partial = path.with_name(f"{path.name}.partial-{socket.gethostname()}-{os.getpid()}")
        self.expected = frames
        self.extradata = b""
        self.damage: dict[str, int] = {}  # what decoding its frames met (video.Damage's counts)
        # A segment's packets are kept in memory until it is done (a few MB for seconds of
        # video): the file is then written once, with its size known and reserved up front.
        self._packets: list[EncodedPacket] = []

    def add(self, packets: list[EncodedPacket]) -> None:
        self._packets += packets

    def close(self, complete: bool) -> None:
        if not complete:
            return
        if len(self._packets) != self.expected:
            raise StagingError(
                f"segment {self.path.name}: the encoder gave {len(self._packets)} packets for {self.expected} frames"
            )
        data = np.frombuffer(b"".join(p.data for p in self._packets), np.uint8)
        offsets = np.cumsum([0] + [len(p.data) for p in self._packets], dtype=np.int64)
        try:
            with h5py.File(self.partial, "w", locking=False) as handle:
                # Reserve the whole file now: a full disk (or a file-size limit) fails here,
                # cleanly, instead of inside HDF5's writes, which it does not survive.
                size = data.nbytes + 17 * len(offsets) + len(self.extradata) + _HDF5_OVERHEAD  # offsets, pts, keyframe
                os.posix_fallocate(handle.id.get_vfd_handle(), 0, size)
                handle.create_dataset("data", data=data)
                handle.create_dataset("offsets", data=offsets)
                handle.create_dataset("pts", data=np.array([p.pts for p in self._packets], np.int64))
                handle.create_dataset("keyframe", data=np.array([p.keyframe for p in self._packets], bool))
                handle.create_dataset("extradata", data=np.frombuffer(self.extradata, np.uint8))
                handle.attrs["damage"] = json.dumps(self.damage)
            # On disk before it is named finished: after a crash a finished name holds every packet.
            with self.partial.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self.partial, self.path)
        except OSError as err:
            raise _staging_error(self.partial, err) from None
        finally:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(complete=exc_type is None)


def _staging_error(path: Path, err: OSError) -> StagingError:
    text = str(err)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "No space left" in text or "file too large" in text.lower():
        return StagingError(f"staging filesystem is full while writing {path}: free space or set staging.root")
    return StagingError(f"cannot write staged frames {path}: {text}")
