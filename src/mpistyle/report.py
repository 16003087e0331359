"""What a user sees: the progress display on rank 0, stage timers, each rank's summary, the JSON
job report (and the part of it fit to deliver) and the preview image (input frames beside their
stylised frames)."""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from . import __version__
from .encode import output_size
from .files import write_atomic
from .video import Damage, probe, read_frames

if TYPE_CHECKING:
    from .flicker import FlickerState
    from .plan import Plan

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
    write_atomic(path, b"".join(bytes(p) for p in packets))


def write_json(path: Path, report: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(report, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_preview(plan: Plan, count: int) -> bool:
    """The preview PNG: ``count`` input frames beside the same frames decoded from the output
    (the styled side shows what was delivered). False when there is nothing to show."""
    info = plan.info
    wanted = preview_indices(info.frames, count)
    if plan.preview is None or not wanted:
        return False
    sources = read_frames(info.path, wanted, info)
    styled = read_frames(str(plan.output), wanted, probe(str(plan.output)))
    write_png(plan.preview, preview_grid([(s, o[: s.shape[0], : s.shape[1]]) for s, o in zip(sources, styled)]))
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass(frozen=True)
class RankFlicker:
    """One rank's warping-error sums: of its output, and of the model's own frames (before any blend)."""

    output: FlickerState
    unblended: FlickerState


@dataclass(frozen=True)
class RankFacts:
    """How one rank is set up for one video: every rank knows every rank's, once set up."""

    rank: int
    host: str
    device: str
    threads: int | None  # torch CPU threads (None on a GPU)
    precision: str  # fp32, bf16 or fp16: what the model ran at
    compiled: bool  # through torch.compile (False: eager, asked for or fallen back to)
    overlap: bool  # decode and encode in threads beside the model
    decoder: str  # FFmpeg's name for it: h264 (the CPU's), h264_cuvid (the GPU's), ...
    encoder: str  # libx264 (the CPU's), h264_nvenc (the GPU's), ...
    batch: int  # frames a model call takes (batch_size; on a GPU, as many as fit)


@dataclass(frozen=True)
class SegmentDone:
    """A rank's note to the root: one segment of one video staged (now, or by an earlier
    attempt), with what it took; the root adds these up into the video's ``per_rank``."""

    video: int  # its place in the job's queue
    rank: int
    number: int  # the segment's
    frames: int
    reused: bool
    frames_decoded: int
    damage: Damage
    reorder_depth: int  # of its packets (mux.reorder_depth): the join's decode timestamps need it
    seconds: dict[str, float]  # decode, score, temporal, encode, stage, waited
    total_s: float  # the rank's time on it, from taking it to handing its last frames to the encoder
    flicker: RankFlicker | None  # the rank's sums for this video so far
    peak_rss_mb: float


def rank_summary(facts: RankFacts, done: Sequence[SegmentDone]) -> RankSummary:
    """What one rank did for one video, from its notes (none: it scored none of the video)."""
    seconds = dict.fromkeys(("decode", "score", "temporal", "encode", "stage", "waited"), 0.0)
    damage = Damage()
    for segment in done:
        damage.add(segment.damage)
        for stage, spent in segment.seconds.items():
            seconds[stage] += spent
    frames = sum(s.frames for s in done)
    scored = frames - sum(s.frames for s in done if s.reused)
    total = sum(s.total_s for s in done)
    return RankSummary(
        **asdict(facts),
        frames=frames,
        segments=[s.number for s in done],
        frames_reused=frames - scored,
        frames_decoded=sum(s.frames_decoded for s in done),
        damage=damage,
        seconds=seconds,
        seconds_total=total,
        peak_rss_mb=max((s.peak_rss_mb for s in done), default=0.0),
        flicker=next((s.flicker for s in reversed(done) if s.flicker), None),  # the latest sums (none for a reused segment)
        fps=scored / total if total > 0 and scored > 0 else None,
    )


@dataclass(frozen=True)
class RankSummary(RankFacts):
    """What one rank did for one video, for the job report's ``per_rank``: how it was set up,
    then these."""

    frames: int  # frames of the segments it was handed
    segments: list[int]  # their numbers, in the order it took them
    frames_reused: int  # found staged by an earlier attempt
    frames_decoded: int  # by this run: its scored frames, and those before a mid-GOP segment
    damage: Damage
    seconds: dict[str, float]  # decode, score, temporal, encode, stage, waited
    seconds_total: float
    peak_rss_mb: float
    flicker: RankFlicker | None
    fps: float | None


@dataclass(frozen=True)
class InputFacts:
    path: str
    container: str
    codec: str
    width: int
    height: int
    frames: int
    duration_s: float
    average_fps: float | None
    gops: int
    audio_streams: int
    rotation: float
    dropped_streams: list[str]


@dataclass(frozen=True)
class OutputFacts:
    path: str
    codec: str
    segments: int
    width: int
    height: int
    frames: int
    bytes: int
    audio: list[dict[str, Any]]  # per stream: its number, codec, and whether it was copied or converted


@dataclass(frozen=True)
class JobReport:
    """The job report, written as JSON beside the output (``report.path``)."""

    mpistyle_version: str
    finished_utc: str
    run_id: str
    input: InputFacts
    output: OutputFacts
    model: dict[str, Any]
    frames: int
    frames_reused: int
    # Frames decoded per frame scored by this run (segments cut inside a long GOP decode from its
    # keyframe); None when every frame was reused.
    decoded_per_scored: float | None
    damage: dict[str, Any]  # the policy, and Damage's counts over every rank
    ranks: int
    devices: list[str]
    per_rank: list[RankSummary]
    stages_s: dict[str, float]
    fps: dict[str, float | None]
    flicker: dict[str, Any] | None
    root_peak_rss_mb: float  # the root's peak, joining included (per_rank peaks are taken after scoring)
    staging: str | None  # kept staging folder
    preview: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunFacts:
    """What the report says about the run beyond the plan and the ranks' summaries."""

    run_id: str
    model: dict[str, Any]
    on_damage: str
    stages_s: dict[str, float]
    total_s: float
    staging_kept: bool
    preview_written: bool


def job_report(plan: Plan, summaries: Sequence[RankSummary], run: RunFacts) -> JobReport:
    """Root: the report of a finished job."""
    info, total = plan.info, run.total_s
    damage = Damage()
    for summary in summaries:
        damage.add(summary.damage)
    score_s = run.stages_s.get("score")
    return JobReport(
        mpistyle_version=__version__,
        finished_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        run_id=run.run_id,
        input=_input_facts(plan),
        output=_output_facts(plan),
        model=run.model,
        frames=info.frames,
        frames_reused=sum(s.frames_reused for s in summaries),
        decoded_per_scored=_decoded_per_scored(summaries),
        damage={"policy": run.on_damage, **asdict(damage)},
        ranks=len(summaries),
        devices=[s.device for s in summaries],
        per_rank=list(summaries),
        stages_s={**{k: round(v, 4) for k, v in run.stages_s.items()}, "total": round(total, 4)},
        fps={
            "end_to_end": round(info.frames / total, 3) if total else None,
            "scoring": round(info.frames / score_s, 3) if score_s else None,
        },
        flicker=_flicker(summaries),
        root_peak_rss_mb=peak_rss_mb(),
        staging=str(plan.staging.dir) if run.staging_kept else None,
        preview=str(plan.preview) if run.preview_written else None,
    )


def _decoded_per_scored(summaries: Sequence[RankSummary]) -> float | None:
    scored = sum(s.frames - s.frames_reused for s in summaries)
    return round(sum(s.frames_decoded for s in summaries) / scored, 3) if scored else None


def _input_facts(plan: Plan) -> InputFacts:
    info = plan.info
    return InputFacts(
        path=info.path,
        container=info.container,
        codec=info.codec,
        width=info.width,
        height=info.height,
        frames=info.frames,
        duration_s=round(info.duration_s, 6),
        average_fps=float(info.average_rate) if info.average_rate else None,
        gops=len(info.keyframe_pts),
        audio_streams=len(info.audio_streams),
        rotation=info.rotation,
        dropped_streams=list(info.dropped_streams),
    )


def _output_facts(plan: Plan) -> OutputFacts:
    width, height = output_size(plan.info.width, plan.info.height)
    return OutputFacts(
        path=str(plan.output),
        codec=plan.settings.codec,
        segments=len(plan.segments),
        width=width,
        height=height,
        frames=plan.info.frames,
        bytes=plan.output.stat().st_size,
        audio=[{"stream": t.stream, "codec": t.codec, "action": t.action} for t in plan.audio],
    )


def _flicker(summaries: Sequence[RankSummary]) -> dict[str, Any] | None:
    """Warping error over every frame pair the ranks scored in this run (pairs across two ranks'
    segments, and segments reused from staging, are not measured)."""
    states = [s.flicker for s in summaries if s.flicker]
    if not states:
        return None
    output, unblended = states[0].output, states[0].unblended
    for state in states[1:]:
        output, unblended = output + state.output, unblended + state.unblended
    return {
        "metric": "warping error (Lai et al. 2018): RGB in [0, 1], mean over frame pairs; flow: OpenCV DIS",
        "output": output.error_sum / output.pairs if output.pairs else None,
        "unblended": unblended.error_sum / unblended.pairs if unblended.pairs else None,
        "pairs": output.pairs,
        "occluded_fraction": output.masked_sum / output.pairs if output.pairs else None,
    }


# What a report delivered to a user may carry: figures about the video and the run, never where
# it ran (paths, host names, run ids, staging folders). An allow-list, so a field added to the job
# report later stays internal until someone decides it is fit to share.
_PUBLIC = (
    "mpistyle_version", "finished_utc", "frames", "frames_reused", "decoded_per_scored", "damage", "ranks", "devices",
    "stages_s", "fps", "flicker", "root_peak_rss_mb",
)
_PUBLIC_SECTIONS = {
    "input": ("container", "codec", "width", "height", "frames", "duration_s", "average_fps", "gops", "audio_streams",
              "rotation", "dropped_streams"),
    "output": ("codec", "segments", "width", "height", "frames", "bytes", "audio"),
}
_PUBLIC_RANK = (
    "rank", "device", "threads", "precision", "compiled", "overlap", "decoder", "encoder", "batch", "frames", "segments",
    "frames_reused",
    "frames_decoded", "damage", "seconds", "seconds_total", "peak_rss_mb", "fps",
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
