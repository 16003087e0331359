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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .encode import EncodedPacket
from .errors import StagingError
from .files import replacing, writable_dir
from .segment import Segment
from .video import Damage

DEFAULT_STAGING = ".mpistyle-staging"


def job_key(parts: dict[str, Any]) -> str:
    """A short stable name for one (input, model, geometry) combination."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Staged:
    """One finished segment as its file holds it."""

    pts: list[int]  # each packet's, in decode order (the input's time base)
    packets: list[EncodedPacket]  # decode order; empty when read without them
    extradata: bytes  # the codec headers its encoder made
    damage: Damage  # what decoding its input frames met


class Staging:
    def __init__(self, root: Path, key: str, job: str | None = None) -> None:
        self.dir = root / key
        self._job = job  # the key without the kernels' suffix (see scored_with)

    @property
    def key(self) -> str:
        """The job key: the folder's name without the kernels' suffix."""
        return self._job or self.dir.name

    def scored_with(self, kernels: str) -> Staging:
        """The staging folder for segments scored by these kernels (and encoded by this
        encoder, when named: ``aot-h264_nvenc``): compiled and eager kernels round differently,
        and segments from two encoders do not join, so a resumed job reuses only segments made
        its own way (the output stays one consistent file)."""
        return Staging(self.dir.parent, f"{self.dir.name}-{kernels}", self.dir.name)

    def create(self) -> None:
        writable_dir(self.dir, "staging directory", StagingError)

    def path(self, segment: Segment) -> Path:
        return self.dir / f"segment-{segment.start:09d}-{segment.stop:09d}.h5"

    def has(self, segment: Segment) -> bool:
        """Whether the segment is staged completely (partial files never count)."""
        return self.path(segment).is_file()

    def writer(self, segment: Segment) -> SegmentWriter:
        return SegmentWriter(self.path(segment), segment.frames)

    def read(self, segment: Segment, packets: bool = True) -> Staged:
        """One finished segment's packet timestamps, codec headers, damage and (unless
        ``packets`` is False: a resumed rank needs only the rest) its packets, in one read."""
        path = self.path(segment)
        try:
            with h5py.File(path, "r", locking=False) as handle:
                offsets, pts, keyframe = (handle[name][:] for name in ("offsets", "pts", "keyframe"))
                data = handle["data"][:].tobytes() if packets else b""
                extradata = handle["extradata"][:].tobytes()
                damage = Damage(**json.loads(handle.attrs.get("damage", "{}")))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise StagingError(f"cannot read staged segment {path}: {err}") from None
        if len(pts) != segment.frames or len(offsets) != len(pts) + 1:
            raise StagingError(f"staged segment {path} holds {len(pts)} frames, expected {segment.frames}")
        encoded = [
            EncodedPacket(data[offsets[i] : offsets[i + 1]], int(pts[i]), bool(keyframe[i]))
            for i in range(len(pts) if packets else 0)
        ]
        return Staged([int(p) for p in pts], encoded, extradata, damage)

    def remove(self, remove_empty_root: bool = False) -> None:
        """Delete this job's staged frames, those other kinds of kernels staged for it in earlier
        attempts too (they will never be used now); also the root folder if asked and nothing
        else is there."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._job is not None:
            for other in self.dir.parent.glob(f"{self._job}-*"):  # other kernels, another encoder
                shutil.rmtree(other, ignore_errors=True)
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
        self.expected = frames
        self.extradata = b""
        self.damage = Damage()  # what decoding its frames met
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
        # Per host and process, and renamed only once on disk (durable): two attempts at the
        # same job never write into each other's file, and after a crash a finished name holds
        # every packet.
        try:
            with replacing(self.path, durable=True) as partial, h5py.File(partial, "w", locking=False) as handle:
                # Reserve the whole file now: a full disk (or a file-size limit) fails here,
                # cleanly, instead of inside HDF5's writes, which it does not survive.
                size = data.nbytes + 17 * len(offsets) + len(self.extradata) + _HDF5_OVERHEAD  # offsets, pts, keyframe
                os.posix_fallocate(handle.id.get_vfd_handle(), 0, size)
                handle.create_dataset("data", data=data)
                handle.create_dataset("offsets", data=offsets)
                handle.create_dataset("pts", data=np.array([p.pts for p in self._packets], np.int64))
                handle.create_dataset("keyframe", data=np.array([p.keyframe for p in self._packets], bool))
                handle.create_dataset("extradata", data=np.frombuffer(self.extradata, np.uint8))
                handle.attrs["damage"] = json.dumps(asdict(self.damage))
        except OSError as err:
            raise _staging_error(self.path, err) from None

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(complete=exc_type is None)


def _staging_error(path: Path, err: OSError) -> StagingError:
    text = str(err)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "No space left" in text or "file too large" in text.lower():
        return StagingError(f"staging filesystem is full while writing {path}: free space or set staging.root")
    return StagingError(f"cannot write staged frames {path}: {text}")
