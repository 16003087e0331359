"""``mpistyle-watch status``: what each video in the work area is doing, read from its state
record (``state/<job>.json``), as a table or as JSON, with an exit code a probe can alert on.

    mpistyle-watch status [--json] [--all] [--stuck-after DURATION] [override ...]

The overrides are the watcher's own (``storage=blob storage.work.url=...``), checked as a tick
checks them. Only the work area is read, and nothing is written: ``state/`` is listed once, then
each record read (a few at a time). A record is *stuck* when it is on its way (claimed, staged,
submitted, finished) and has not changed step for ``stuck_after_s`` (``--stuck-after``), or is
waiting out its backoff after ``retry_alert`` job failures in a row that were not its input's
fault (what makes a tick exit 9), or cannot be read at all (every tick fails on it). A final
record (done, quarantined, superseded, abandoned) is never stuck. By default the final records
that ended more than a day ago are left out; ``--all`` shows every record.

Exit codes: 0 nothing stuck; 10 at least one record stuck; 2 bad configuration or usage; 9 the
work area could not be read.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from ..errors import MpistyleError, StorageError, first_line
from ..secrets import from_env, redact
from . import config as watch_config
from .areas import Area, Entry, open_area
from .names import is_job_key, shown
from .watcher import FINAL, STEPS, backing_off

STUCK_EXIT = 10  # errors.py and the README list it with the other exit codes
RECENT_S = 86400.0  # final records shown by default: those that ended this recently
WIDTH = 120  # the table's width, in terminal columns
_READERS = 8  # records read at once (one request each on blob storage)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_WHOLE = 1 << 16  # names.shown's limit, for a text the table cuts itself


@dataclass(frozen=True)
class VideoStatus:
    """One state record as status shows it. Every text is one line, scrubbed of secrets; times
    are seconds since the epoch."""

    key: str  # the job key: state/<key>.json, logs/<key>/, quarantine/<key>/ in the work area
    input: str | None  # the video's name in the input area
    etag: str | None  # its version
    step: str  # a watcher step, or "unreadable"
    attempts: int  # failures that may be the input's fault
    retries: int  # failures that were not
    retry_after: float | None  # when a failure not the input's is retried
    backing_off: bool  # waiting for retry_after
    created: float | None  # when the video was claimed
    step_since: float | None  # when the record took its current step
    updated: float | None  # its last change (a lease renewal too)
    job: str | None  # the runner's handle of its last job (slurm:<id>, local:<host>:<pgid>:<start>)
    batch: str | None  # the batch its last job was, with max_batch > 1
    exit_code: int | None  # its last job's
    failure: str | None  # why its last job failed
    reason: str | None  # why it ended (quarantined, superseded, abandoned)
    output: str | None  # its name in the output area, once done
    owner: str | None  # the watcher (host:pid) that last held it
    lease_until: float | None  # until when that watcher holds it (0: nobody does)
    stuck: str | None  # why it is stuck; None when it is not

    @property
    def final(self) -> bool:
        return self.step in FINAL

    @property
    def error(self) -> str | None:
        """The one line the table shows: why it ended, or how its last job failed."""
        if self.final:
            return self.reason if self.step != "done" else None
        if self.failure is None:
            return None
        return self.failure if self.exit_code is None else f"exit {self.exit_code}: {self.failure}"


@dataclass(frozen=True)
class Survey:
    work: str  # the work area, for people
    now: float
    stuck_after_s: float
    retry_alert: int
    everything: bool  # --all
    videos: list[VideoStatus]  # every record, most urgent first

    @property
    def shown(self) -> list[VideoStatus]:
        if self.everything:
            return self.videos
        return [v for v in self.videos if not v.final or _since(v.step_since, self.now) <= RECENT_S]

    @property
    def stuck(self) -> list[VideoStatus]:
        return [v for v in self.videos if v.stuck]


# -- reading ---------------------------------------------------------------------------------------


def survey(cfg: DictConfig, now: float, stuck_after_s: float, everything: bool = False) -> Survey:
    """Every state record in ``cfg``'s work area, assessed at ``now``."""
    area = cfg.storage.work
    if area.kind == "local" and area.root and not Path(area.root).expanduser().is_dir():
        # Opening a local area creates its folder: a probe with a mistyped root would find an
        # empty, healthy-looking area instead of saying so.
        raise StorageError(f"the local work folder {area.root} does not exist (storage.work.root): has a tick run with it?")
    work = open_area("work", area)
    where = str(area.url).rstrip("/") if area.kind == "blob" else str(Path(area.root).expanduser().absolute())
    where += f"/{area.prefix}" if area.prefix else ""
    videos = [assess(entry, data, now, stuck_after_s, cfg.retry_alert) for entry, data in read_records(work)]
    videos.sort(key=lambda video: _urgency(video, now))
    return Survey(redact(where), now, stuck_after_s, cfg.retry_alert, everything, videos)


def read_records(work: Area) -> list[tuple[Entry, dict[str, Any] | str]]:
    """Each state record in ``work``, listed once and read a few at a time: its data, or why it
    cannot be read. Records gone since the listing (swept) are left out."""
    entries = [entry for entry in work.list("state/") if _key(entry) is not None]
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        found = list(pool.map(lambda entry: _read(work, entry), entries))
    return [(entry, data) for entry, data in zip(entries, found, strict=True) if data is not None]


def _key(entry: Entry) -> str | None:
    """The job key of a record's name, or None for a name the watcher never writes there."""
    key = entry.name.removeprefix("state/").removesuffix(".json")
    return key if entry.name == f"state/{key}.json" and is_job_key(key) else None


def _read(work: Area, entry: Entry) -> dict[str, Any] | str | None:
    try:
        found = work.read_json(entry.name)
    except ValueError as err:  # not JSON, or not UTF-8
        return f"not JSON: {first_line(err)}"
    if found is None:
        return None
    return found[0] if isinstance(found[0], dict) else "not a JSON object"


def assess(entry: Entry, data: dict[str, Any] | str, now: float, stuck_after_s: float, retry_alert: int) -> VideoStatus:
    """One record, as status shows it: a record is data anyone with access to the work area can
    write, so every field is checked for its type, and every text scrubbed."""
    key = _key(entry) or entry.name
    written = entry.modified / 1e9 if entry.modified else None  # the record's last write
    if isinstance(data, str):
        return VideoStatus(
            key=key, input=None, etag=None, step="unreadable", attempts=0, retries=0, retry_after=None, backing_off=False,
            created=None, step_since=written, updated=written, job=None, batch=None, exit_code=None,
            failure=redact(data), reason=None, output=None, owner=None, lease_until=None,
            stuck=f"its record is unreadable ({redact(data)}): every tick fails on it",
        )
    listed = data.get("history")
    history = [item for item in listed if isinstance(item, dict)] if isinstance(listed, list) else []
    step = _line(data.get("step")) or "unknown"
    updated = _time(data.get("updated"))
    step_since = (_time(history[-1].get("at")) if history else None) or updated or written
    created = _time(data.get("created")) or (_time(history[0].get("at")) if history else None)
    retries, retry_after = _count(data.get("retries")), _number(data.get("retry_after"))
    waiting = backing_off({"step": step, "retries": retries, "retry_after": retry_after or 0}, retry_alert, now)
    stuck: str | None = None
    if step in FINAL:
        pass
    elif step not in STEPS:
        stuck = f"an unknown step {shown(step, 40)!r}: no tick can move it"
    elif waiting == "stuck":
        stuck = f"{retries} failures in a row, none the input's fault (retry_alert={retry_alert})"
    elif _since(step_since, now) > stuck_after_s:
        stuck = f"{step} for {duration(_since(step_since, now))}, more than {duration(stuck_after_s)}"
    exit_code = data.get("exit_code")
    return VideoStatus(
        key=key, input=_line(data.get("input")), etag=_line(data.get("etag")), step=step, attempts=_count(data.get("attempts")),
        retries=retries, retry_after=retry_after, backing_off=waiting is not None, created=created, step_since=step_since,
        updated=updated, job=_line(data.get("job")), batch=_line(data.get("batch")),
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        failure=_line(data.get("failure")), reason=_line(data.get("reason")), output=_line(data.get("output")),
        owner=_line(data.get("owner")), lease_until=_number(data.get("lease_until")), stuck=stuck,
    )


def _line(value: Any) -> str | None:
    """A record's text as one line, scrubbed of secrets (the whole text first: a secret is never
    cut in two where it could no longer be recognised)."""
    if value is None:
        return None
    text = redact(str(value)).strip()
    return text.splitlines()[0] if text else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _time(value: Any) -> float | None:
    """A record's ISO 8601 time stamp in seconds since the epoch, or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _since(when: float | None, now: float) -> float:
    return max(0.0, now - when) if when is not None else 0.0


def _urgency(video: VideoStatus, now: float) -> tuple[int, float]:
    """Stuck first, then those on their way, each the longest in its step first; then the final
    ones, the latest first."""
    in_step = _since(video.step_since, now)
    if video.stuck:
        return 0, -in_step
    return (2, in_step) if video.final else (1, -in_step)


# -- showing ---------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``12h``, ``2d04h``, ``1d``: two units at most."""
    whole = int(max(0.0, seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    big, small, unit, second_unit = (whole // 3600, whole % 3600 // 60, "h", "m") if whole < 86400 else (
        whole // 86400, whole % 86400 // 3600, "d", "h")
    return f"{big}{unit}{small:02d}{second_unit}" if small else f"{big}{unit}"


def _iso(when: float | None) -> str | None:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds") if when is not None else None


def as_json(found: Survey) -> dict[str, Any]:
    """The survey for programs: stable keys (docs/watch.md lists them), times in ISO 8601 (UTC)
    and durations in whole seconds."""
    now = found.now

    def video(v: VideoStatus) -> dict[str, Any]:
        return {
            "key": v.key, "input": v.input, "etag": v.etag, "step": v.step, "final": v.final, "stuck": v.stuck is not None,
            "stuck_why": v.stuck, "attempts": v.attempts, "retries": v.retries, "backing_off": v.backing_off,
            "retry_after": _iso(v.retry_after), "created": _iso(v.created),
            "age_s": round(_since(v.created, now)) if v.created is not None else None,
            "step_since": _iso(v.step_since), "in_step_s": round(_since(v.step_since, now)) if v.step_since is not None else None,
            "updated": _iso(v.updated), "job": v.job, "batch": v.batch, "exit_code": v.exit_code, "failure": v.failure,
            "reason": v.reason, "output": v.output, "owner": v.owner,
            "lease_until": _iso(v.lease_until) if v.lease_until else None,
            "lease_held": bool(v.lease_until and v.lease_until > now and not v.final),
        }

    return {
        "now": _iso(now), "work": found.work, "stuck_after_s": found.stuck_after_s, "retry_alert": found.retry_alert,
        "recent_s": None if found.everything else RECENT_S, "records": len(found.videos),
        "steps": dict(sorted(Counter(v.step for v in found.videos).items())), "stuck": len(found.stuck),
        "videos": [video(v) for v in found.shown],
    }


# (title, width in terminal columns); the last column takes what is left of WIDTH.
_COLUMNS = (("", 1), ("VIDEO", 24), ("VERSION", 8), ("STATE", 11), ("ATT", 3), ("RETRY", 8), ("AGE", 6),
            ("IN STEP", 7), ("JOB", 14), ("LAST ERROR", 0))


def table(found: Survey) -> str:
    """The survey for people: a summary line, one row per record shown (``!`` marks the stuck
    ones), at most ``WIDTH`` columns wide; long texts are cut with an ellipsis (a name keeps its
    end, where the file name is)."""
    steps = ", ".join(f"{n} {shown(step)}" for step, n in Counter(v.step for v in found.videos).most_common())
    lines = [
        _fit(f"work area: {shown(found.work, _WHOLE)}", WIDTH).rstrip(),
        _fit(f"{len(found.videos)} record(s){': ' if steps else ''}{steps}; {len(found.stuck)} stuck", WIDTH).rstrip(),
    ]
    shown_videos = found.shown
    if shown_videos:
        widths = [width for _, width in _COLUMNS]
        widths[-1] = WIDTH - sum(widths) - (len(widths) - 1)
        lines.append(_row([title for title, _ in _COLUMNS], widths))
        for v in shown_videos:
            lines.append(_row(_cells_of(v, found.now), widths, keep_end={1, 2}))
    hidden = len(found.videos) - len(shown_videos)
    if hidden:
        lines.append(f"{hidden} final record(s) that ended more than {duration(RECENT_S)} ago not shown (--all shows them)")
    if found.stuck:
        lines += [
            # Not starting with "!": grep '^!' gives the stuck rows alone.
            f"stuck (!): on its way with no new step for {duration(found.stuck_after_s)} (stuck_after_s, --stuck-after), "
            f"backing off after {found.retry_alert}",
            "failures in a row not the input's (retry_alert), or a record no tick can read or move; --json says why",
        ]
    return "\n".join(lines)


def _cells_of(v: VideoStatus, now: float) -> list[str]:
    retry = str(v.retries) if v.retries else "-"
    if v.backing_off and v.retry_after is not None:
        retry += f" {duration(v.retry_after - now)}"
    texts = [v.input if v.input is not None else v.key, v.etag or "-", v.step]
    return [
        "!" if v.stuck else "", *(shown(text, _WHOLE) for text in texts), str(v.attempts), retry,
        duration(_since(v.created, now)) if v.created is not None else "-", duration(_since(v.step_since, now)),
        shown(v.job or "-", _WHOLE), shown(v.error or "", _WHOLE),
    ]


def _row(cells: list[str], widths: list[int], keep_end: set[int] | frozenset[int] = frozenset()) -> str:
    return " ".join(_fit(cell, width, index in keep_end) for index, (cell, width) in enumerate(zip(cells, widths,
                                                                                                  strict=True))).rstrip()


def _columns(char: str) -> int:
    """How many terminal columns ``char`` takes: wide East Asian ones two, combining marks none."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _fit(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` in exactly ``width`` columns: padded, or cut with an ellipsis (at the start when
    ``keep_end``)."""
    used = sum(_columns(char) for char in text)
    if used > width:
        kept, used = [], 1  # the ellipsis
        for char in reversed(text) if keep_end else text:
            if used + _columns(char) > width:
                break
            kept.append(char)
            used += _columns(char)
        text = "…" + "".join(reversed(kept)) if keep_end else "".join(kept) + "…"
    return text + " " * (width - used)


# -- the command -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Usage errors repeat the arguments, which may carry a SAS URL.
        self.print_usage(sys.stderr)
        self.exit(2, redact(f"{self.prog}: error: {message}\n"))


def _duration(text: str) -> float:
    """``6h``, ``90m``, ``1.5d``, ``3600s`` or ``3600`` in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text)
    if match is None or not float(match.group(1)) > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 6h, 90m, 2d or 3600 (seconds)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mpistyle-watch status",
        description="What each video in the watcher's work area is doing, from its state record; the work area "
        "comes from the same overrides a tick takes (storage=blob storage.work.url=...).",
        epilog=f"exit codes: 0 nothing stuck, {STUCK_EXIT} a record stuck, 2 bad configuration or usage, "
        f"{StorageError.exit_code} the work area could not be read",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (keys listed in docs/watch.md) instead of a table")
    parser.add_argument("--all", action="store_true", dest="everything",
                        help=f"show every record, also the final ones that ended more than {duration(RECENT_S)} ago")
    parser.add_argument("--stuck-after", type=_duration, metavar="DURATION",
                        help="stuck: on its way with no new step for this long (default: the stuck_after_s setting)")
    parser.add_argument("overrides", nargs="*", metavar="override", help="the watcher's Hydra overrides")
    return parser


def main(argv: list[str]) -> NoReturn:
    from ..cli import compose_or_exit

    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s [mpistyle-watch status] %(levelname)s %(message)s")
    watch_config.register()
    cfg = compose_or_exit(args.overrides, "watch")
    try:
        watch_config.check(cfg)
        for variable in watch_config.credential_names(cfg.storage):
            from_env(variable)  # remembered, to be scrubbed from anything shown
        stuck_after_s = args.stuck_after if args.stuck_after is not None else cfg.stuck_after_s
        found = survey(cfg, time.time(), stuck_after_s, args.everything)
    except MpistyleError as err:
        print(redact(f"error: {first_line(err)}"), file=sys.stderr)
        sys.exit(err.exit_code)
    print(json.dumps(as_json(found), indent=2) if args.json else table(found))
    sys.exit(STUCK_EXIT if found.stuck else 0)
