"""What a user sees: the progress display on rank 0, stage timers, the JSON job report and
the preview image (input frames beside their stylised frames)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np

from .errors import OutputError

log = logging.getLogger(__name__)


class StageTimer:
    """Wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Progress:
    """Frames done across all ranks: a bar on a terminal, or a log line every few seconds."""

    def __init__(self, total: int, mode: str, interval_s: float) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.interval_s = interval_s
        self._last_log = self.start
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="frame", desc="styling", dynamic_ncols=True, file=sys.stderr)

    def add(self, frames: int) -> None:
        self.done += frames
        if self._bar is not None:
            self._bar.update(frames)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self._last_log >= self.interval_s or self.done == self.total:
                self._last_log = now
                log.info("progress: %s", self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        fps = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / fps if fps > 0 else float("nan")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} frames ({percent:.0f}%), {fps:.1f} fps, ETA {eta:.0f} s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def preview_indices(frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly from the first frame to the last."""
    if count <= 0 or frames <= 0:
        return []
    return sorted({round(i * (frames - 1) / max(1, count - 1)) for i in range(min(count, frames))})


def _thumbnail(frame: np.ndarray, width: int) -> np.ndarray:
    height = max(2, round(frame.shape[0] * width / frame.shape[1]) // 2 * 2)
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    return image.reformat(width=width, height=height, format="rgb24").to_ndarray()


def preview_grid(pairs: Sequence[tuple[np.ndarray, np.ndarray]], width: int = 320, gap: int = 4) -> np.ndarray:
    """One row per frame: the input on the left, its stylised output on the right."""
    rows = []
    for source, styled in pairs:
        left, right = _thumbnail(source, width), _thumbnail(styled[: source.shape[0], : source.shape[1]], width)
        spacer = np.full((left.shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([left, spacer, right], axis=1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def write_png(path: Path, image: np.ndarray) -> None:
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
    packets += codec.encode(None)
    atomic_write(path, b"".join(bytes(p) for p in packets))


def write_json(path: Path, report: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(report, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror}") from None


# What a report delivered to a user may carry: figures about the video and the run, never where
# it ran (paths, host names, run ids, staging folders). An allow-list, so a field added to the job
# report later stays internal until someone decides it is fit to share.
_PUBLIC = (
    "mpistyle_version", "finished_utc", "frames", "frames_reused", "damage", "ranks", "devices", "stages_s", "fps",
    "flicker", "root_peak_rss_mb",
)
_PUBLIC_SECTIONS = {
    "input": ("container", "codec", "width", "height", "frames", "duration_s", "average_fps", "gops", "audio_streams",
              "rotation", "dropped_streams"),
    "output": ("codec", "segments", "width", "height", "frames", "bytes", "audio"),
}
_PUBLIC_RANK = (
    "rank", "device", "threads", "overlap", "frames", "first_frame", "segments", "frames_reused", "damage", "seconds",
    "seconds_total", "peak_rss_mb", "fps",
)


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The job report without what only an operator needs: each path becomes its base name
    (``name`` in ``input`` and ``output``), per-rank figures lose the host, the run id goes."""
    public = {key: report[key] for key in _PUBLIC if key in report}
    for section, keys in _PUBLIC_SECTIONS.items():
        part = report.get(section)
        if isinstance(part, dict):
            public[section] = {"name": _base_names(part.get("path")), **{k: part[k] for k in keys if k in part}}
    if "model" in report:
        public["model"] = _base_names(report["model"])  # a checkpoint or style image: its file name
    if isinstance(report.get("per_rank"), list):
        public["per_rank"] = [{k: rank[k] for k in _PUBLIC_RANK if k in rank} for rank in report["per_rank"]]
    if report.get("preview"):
        public["preview"] = _base_names(report["preview"])
    return public


def _base_names(value: Any) -> Any:
    """``value`` with every string that looks like a path cut to its last part."""
    if isinstance(value, dict):
        return {key: _base_names(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_base_names(item) for item in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value
