"""Which videos a batch job does (``inputs=``): every video in a folder, one path a line in a list
file, or one JSON object a line in a ``.jsonl`` file, each with its output and the per-video
settings an allow-list lets a line set. No MPI, no decoding: the root reads this, then plans each
video as a job of its own.

    inputs=videos/ output_dir=styled/       # videos/*.mp4 ... -> styled/<name>.mp4
    inputs=list.txt output_dir=styled/      # one path a line; blank lines and # comments skipped
    inputs=jobs.jsonl                       # {"input": "a.mov", "output": "a.mp4", "model.style": 5}

Relative paths in a list or JSONL file are taken from the file's folder. A line that names no
input, repeats one, or sets what is not allowed fails alone (the batch report names it); what
makes the whole batch impossible (no such folder, two videos writing one output) is an error
before any work.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _number(value: object) -> bool:
    # Finite: json reads NaN and Infinity, which no setting means.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object) -> bool:
    return isinstance(value, str) and "${" not in value


def _blend(value: object) -> bool:
    """``"3:0.5,19:0.5"`` or ``{"3": 0.5, "19": 0.5}``: flat, style numbers to weights."""
    if isinstance(value, dict):
        return all(str(key).isdigit() and _number(weight) for key, weight in value.items())
    return _text(value)


# Per-video settings a JSONL line may set, each with the one kind of value it takes: what changes
# a video's look, never where the job writes, which code runs (model._target_, weights, anything
# nested), its limits, or Hydra's own keys.
_SETTINGS = {
    "model.style": (_whole, "a whole number"),
    "model.blend": (_blend, 'style numbers to weights, {"3": 0.5, "19": 0.5} or "3:0.5,19:0.5"'),
    "model.style_image": (_text, "a path"),
    "model.style_strength": (_number, "a number"),
    "temporal.alpha": (_number, "a number"),
    "video.crf": (_whole, "a whole number"),
    "video.preset": (lambda value: isinstance(value, str) and value.isalpha(), "a preset's name"),
}
PER_VIDEO_SETTINGS = frozenset(_SETTINGS)
# What a folder's files must end in to be taken as videos (any other file there is left alone).
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".flv", ".mpg", ".mpeg", ".mxf", ".3gp"}
)
OUTPUT_SUFFIX = ".mp4"
# Per-video settings that name a file: relative to the JSONL file's folder, like its paths.
_PATH_SETTINGS = frozenset({"model.style_image"})


@dataclass(frozen=True)
class BatchItem:
    """One video of the batch, or one line that cannot be one (``error`` says why)."""

    source: str  # where it came from: "videos/a.mp4", "jobs.jsonl:3"
    input: Path | None = None
    output: Path | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)  # from PER_VIDEO_SETTINGS
    error: str | None = None


def read_inputs(inputs: str, output_dir: str | None) -> list[BatchItem]:
    """The batch ``inputs`` names, in order, each with its output (in ``output_dir`` unless a
    JSONL line names one)."""
    source = Path(inputs).expanduser()
    out_dir = Path(output_dir).expanduser().absolute() if output_dir else None
    if source.is_dir():
        if out_dir is not None and out_dir.resolve() == source.resolve():
            raise ConfigError(f"output_dir={output_dir} is the inputs folder: the next batch would take the outputs for inputs")
        items = _folder(source, _needs(out_dir, "a folder"))
    elif not source.is_file():
        raise ConfigError(f"inputs={inputs}: no such folder or file")
    elif source.suffix.lower() == ".jsonl":
        items = _jsonl(source, out_dir)
    else:
        items = _list(source, _needs(out_dir, "a list file"))
    if not any(item.error is None for item in items):
        raise ConfigError(f"inputs={inputs} names no video mpistyle can do ({len(items)} line(s) refused)")
    _refuse_shared_outputs(items)
    return items


def _needs(out_dir: Path | None, what: str) -> Path:
    if out_dir is None:
        raise ConfigError(f"inputs= names {what}: add output_dir=FOLDER for the styled videos")
    return out_dir


def _folder(folder: Path, out_dir: Path) -> list[BatchItem]:
    """Every video file directly in ``folder`` (not its subfolders), by name."""
    try:
        videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    except OSError as err:
        raise ConfigError(f"inputs={folder}: cannot list it ({err.strerror})") from None
    return [_checked(BatchItem(str(p), p.absolute(), out_dir / f"{p.stem}{OUTPUT_SUFFIX}")) for p in videos]


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"inputs={path}: cannot read it ({err})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line.strip()


def _list(path: Path, out_dir: Path) -> list[BatchItem]:
    items = []
    for number, line in _lines(path):
        video = _resolve(path.parent, line)
        items.append(_checked(BatchItem(f"{path.name}:{number}", video, out_dir / f"{video.stem}{OUTPUT_SUFFIX}")))
    return _first_of_each(items)


def _jsonl(path: Path, out_dir: Path | None) -> list[BatchItem]:
    items = []
    for number, line in _lines(path):
        where = f"{path.name}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            items.append(BatchItem(where, error=f"not a JSON object ({err.msg} at column {err.colno})"))
            continue
        items.append(_entry(where, entry, path.parent, out_dir))
    return _first_of_each(items)


def _entry(where: str, entry: object, base: Path, out_dir: Path | None) -> BatchItem:
    if not isinstance(entry, dict):
        return BatchItem(where, error=f"not a JSON object but {type(entry).__name__}")
    entry = dict(entry)
    video = entry.pop("input", None)
    if not isinstance(video, str) or not video:
        return BatchItem(where, error='names no "input" (a path)')
    video_path = _resolve(base, video)
    output = entry.pop("output", None)
    if output is not None and not isinstance(output, str):
        return BatchItem(where, video_path, error='"output" is not a path')
    if output is None and out_dir is None:
        return BatchItem(where, video_path, error='names no "output", and the job has no output_dir=')
    output_path = _resolve(base, output) if output else out_dir / f"{video_path.stem}{OUTPUT_SUFFIX}"  # type: ignore[operator]
    refused = sorted(key for key in entry if key not in PER_VIDEO_SETTINGS)
    if refused:
        return BatchItem(
            where, video_path, output_path,
            error=f"sets {', '.join(refused)}, which a batch line may not (allowed: {', '.join(sorted(PER_VIDEO_SETTINGS))})",
        )
    for key, value in entry.items():
        error = setting_error(key, value)
        if error is not None:
            return BatchItem(where, video_path, output_path, error=error)
    settings = {key: str(_resolve(base, value)) if key in _PATH_SETTINGS and isinstance(value, str) else value
                for key, value in entry.items()}
    return _checked(BatchItem(where, video_path, output_path, settings))


def setting_error(key: str, value: object) -> str | None:
    """Why ``value`` cannot be the per-video setting ``key`` (one of :data:`PER_VIDEO_SETTINGS`),
    or None: the one check of a setting's value, for a batch line and the watcher's settings files."""
    takes, kind = _SETTINGS[key]
    return None if takes(value) else f"{key} must be {kind}, got {json.dumps(value)[:80]}"


def _resolve(base: Path, path: str) -> Path:
    try:
        candidate = Path(path).expanduser()
    except RuntimeError:  # ~someone who is not a user here
        candidate = Path(path)
    return (candidate if candidate.is_absolute() else base / candidate).absolute()


def _checked(item: BatchItem) -> BatchItem:
    """``item``, or the same with an error if its input is not a file here, or a path holds
    ``${`` (the config would read it as an interpolation): it fails alone."""
    assert item.input is not None
    if any("${" in str(path) for path in (item.input, item.output)):
        return BatchItem(item.source, item.input, item.output, item.settings, error="a path holds '${': rename it")
    if not item.input.is_file():
        return BatchItem(item.source, item.input, item.output, item.settings, error=f"input not found: {item.input}")
    return item


def _first_of_each(items: list[BatchItem]) -> list[BatchItem]:
    """A video named twice is done once: the later line is refused, naming the first."""
    seen: dict[tuple[Path, str], str] = {}
    kept = []
    for item in items:
        if item.error is None and item.input is not None:
            key = (item.input, json.dumps(dict(item.settings), sort_keys=True))
            if key in seen:
                item = BatchItem(item.source, item.input, item.output, item.settings, error=f"repeats {seen[key]}")
            else:
                seen[key] = item.source
        kept.append(item)
    return kept


def _refuse_shared_outputs(items: list[BatchItem]) -> None:
    """Two videos writing one output would overwrite each other: the batch is refused."""
    inputs = {item.input.resolve(): item.source for item in items if item.error is None and item.input is not None}
    for item in items:
        if item.error is None and item.output is not None and item.output.resolve() in inputs:
            raise ConfigError(f"{item.source} would write over {inputs[item.output.resolve()]}'s input {item.output}")
    writers: dict[Path, list[str]] = {}
    for item in items:
        if item.error is None and item.output is not None:
            writers.setdefault(item.output.resolve(), []).append(item.source)
    clashes = {output: sources for output, sources in writers.items() if len(sources) > 1}
    if clashes:
        output, sources = next(iter(clashes.items()))
        raise ConfigError(
            f"{len(sources)} inputs would write {output} ({', '.join(sources)}): rename one, "
            "or give each its own output in a JSONL file"
        )
