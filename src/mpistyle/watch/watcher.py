"""``mpistyle-watch``: one tick of the storage watcher, run by cron, a systemd timer or scrontab.

Each tick lists the input area and moves every video one or more steps along

    claimed -> staged -> submitted -> finished -> done

recording each step in a state record in the work area (``state/<job>.json``). Records are
created only if absent and replaced only if unchanged since read, so two watchers never take
the same video, and a watcher killed at any point leaves a record the next tick continues from:
every step is safe to repeat. A claim carries a lease that a heartbeat renews while this
watcher works on it; a dead watcher's lease runs out and another takes over (and follows the
job the dead one started rather than starting a second).

The other final states: ``quarantined`` (a name that is not a video name or cannot be stored
everywhere, at once and without downloading it; an input the job finds unusable, exit 3; or
``max_attempts`` failures that may be the input's fault: a bug or the time limit), copied to
``quarantine/<job>/`` with ``error.json`` a person can read; ``superseded`` (a newer upload of
the same name came first); ``abandoned`` (the input went before its job ended). A failure that
is not the input's fault (staging full, a failed node, ...) is retried on a later tick with
backoff (:func:`mpistyle.watch.runners.blame`), and the others carry on.

Before any job, a video is checked on this host as its job will check it (:meth:`Watcher._stage`):
its settings file ``<name>.json`` (:mod:`.sidecar`), which becomes its job's overrides and is
part of its job key, its style image, and the project's probe with the jobs' own ``limits.*``.
What the job would refuse is quarantined here. Flood control (:meth:`Watcher._held`): no job
starts while the runner holds ``max_active_jobs``, nor past ``max_submit_per_tick`` a tick; the
videos wait, not downloaded ("held").

With ``max_batch`` > 1, the videos of a tick that are ready to start run together, up to
``max_batch`` at a time, as one batch job (``inputs=`` a JSONL file in ``workdir/batches/``):
each record still moves on its own, by its own outcome in the batch (its output, or its
``.error.json``), so a poison video is quarantined while the others of its batch are delivered.

``mpistyle-watch status`` reads the records and says which are stuck (:mod:`mpistyle.watch.status`).
With ``every=SECONDS`` the process ticks in a loop instead (:func:`tick_every`), the one that
serves the Prometheus endpoint of its metrics (:mod:`mpistyle.watch.metrics`). With
``intake=queue`` a tick takes the videos Event Grid's events name instead of listing the input
(:mod:`mpistyle.watch.intake`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from ..config import plain
from ..errors import ConfigError, InputError, MpistyleError, SomeVideosFailed, StorageError, first_line
from ..files import write_atomic
from ..formats import VIDEO_SUFFIXES
from ..report import public_report
from ..secrets import redact
from ..video import Limits, probe, probe_picture
from . import config as watch_config
from . import metrics as watch_metrics
from . import sidecar
from .areas import Area, BlobArea, Entry, StateConflict, open_area
from .intake import Event, EventQueue, Message, Unusable, blob_created, read, revisited
from .names import UnsafeName, is_job_key, job_name, output_name, shown, suffix_of
from .runners import (
    DEFAULT_SBATCH_SCRIPT,
    JOB_PREFIX,
    JobSpec,
    JobStatus,
    LocalRunner,
    Runner,
    SlurmRunner,
    blame,
    meaning,
)

log = logging.getLogger("mpistyle.watch")
STEPS = ("claimed", "staged", "submitted", "finished")  # on the way; a record in one is advanced by ticks
FINAL = ("done", "quarantined", "superseded", "abandoned")
# Delivered beside each video, under its name plus these.
_SIDE_FILES = (".report.json", ".preview.png")
_BATCH_NAME = re.compile(r"[0-9a-f]{16}")  # workdir/batches/<name>/: a hash of its videos' keys
_WITHIN_LIMITS = (
    "upload a video within the limit the reason names, or ask whoever runs the watcher to raise it (limits.* in "
    "job_overrides); a new upload is a new job"
)
T = TypeVar("T")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def backing_off(data: dict[str, Any], retry_alert: int, now: float) -> str | None:
    """For a record waiting out its backoff after a job failure that was not its input's fault:
    "waiting", or "stuck" once ``retry_alert`` such failures came in a row (a tick exits 9 for
    it, and ``mpistyle-watch status`` counts it stuck); None for any other record."""
    if data["step"] != "staged" or not data.get("retry_after", 0) > now:
        return None
    return "stuck" if data.get("retries", 0) >= retry_alert else "waiting"


@dataclass
class Claim:
    """A state record this watcher holds. Every change is a conditional write."""

    area: Area
    name: str
    data: dict[str, Any]
    etag: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, **changes: Any) -> None:
        with self.lock:
            data = {**self.data, **changes, "updated": _now()}
            if "step" in changes:
                data["history"] = [*self.data.get("history", []), {"step": changes["step"], "at": data["updated"]}]
            self.etag = self.area.replace_json(self.name, data, self.etag)
            self.data = data


@dataclass
class Queued:
    """A staged video waiting, its claim still held, for the tick to start it in a batch job."""

    claim: Claim
    entry: Entry
    key: str
    held: ExitStack  # its heartbeat, and giving its claim up: closed once the tick is done with it


@dataclass
class Taken:
    """A queue message this tick read, and what became of its video."""

    message: Message
    event: Event | None = None  # None: not an event this watcher acts on
    key: str | None = None  # the video's job key; None: nothing to follow (ignored, or the blob is gone)
    outcome: str = "ignored"


class _Refused(Exception):
    """What the video's job would refuse, found on this host before any job: the video is
    quarantined at once, with the reason and what to do."""

    def __init__(self, reason: str, what_to_do: str) -> None:
        super().__init__(reason)
        self.reason, self.what_to_do = reason, what_to_do


class Watcher:
    def __init__(
        self, cfg: DictConfig, areas: dict[str, Area], runner: Runner, owner: str | None = None,
        intake: EventQueue | None = None, metrics: watch_metrics.WatchMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.input, self.output, self.work = areas["input"], areas["output"], areas["work"]
        self.runner = runner
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.workdir = Path(cfg.workdir).expanduser().absolute()
        self.intake = intake
        self.metrics = metrics or watch_metrics.WatchMetrics()
        self._sidecars: dict[str, Entry] = {}  # the listed settings files, by their video's name
        self._limits: Limits | None = None  # the jobs' limits.*, composed once
        # Flood control, per tick: the jobs this tick started, why it may start no more, and the
        # runner's count of active jobs when the tick first asked.
        self._started, self._full, self._active = 0, "", -1

    def tick(self) -> dict[str, int]:
        """Move the videos on (every one listed, or those the queue's events name); returns how
        many had each outcome."""
        try:
            return self._tick()
        except MpistyleError:
            self.metrics.errors.add(1)  # the whole tick failed (a listing): storage or scheduler trouble
            raise

    def _tick(self) -> dict[str, int]:
        began = time.monotonic()
        self.metrics.tick_started()
        self._started, self._full, self._active = 0, "", -1
        if self.intake is None:
            entries = self._videos(self.input.list())
            reached, swept = self._listed(entries, entries)
            unreached = len(entries) - len(reached)
        else:
            reached, swept, unreached = self._from_queue(self.intake)
        self._sweep_batches()
        counts = dict(Counter(reached + swept))
        self.metrics.errors.add(counts.get("error", 0))
        pending = [outcome for outcome in reached if outcome not in (*FINAL, "ignored", "gone")]
        self.metrics.tick_ended(time.monotonic() - began, pending=pending, unreached=unreached)
        log.info("tick: %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no input")
        return counts

    def _listed(self, entries: list[Entry], fresh: list[Entry]) -> tuple[list[str], list[str]]:
        """Carry on every video of ``fresh`` (some or all of the listing ``entries``), then sweep
        the records whose input is no longer in ``entries``; returns the outcomes of the videos
        reached, and the sweep's."""
        outcomes: list[str] = []
        # With max_batch > 1, the videos ready to start wait here (their claims held) and start
        # together, max_batch at a time; those taken before tick_time_limit_s start even past it.
        queue: list[Queued] | None = [] if self.cfg.max_batch > 1 else None
        for entry in self._within_tick_limit(fresh):
            outcomes.append(self._guarded(entry.name, partial(self.advance, entry, queue)))
            if queue is not None and len(queue) >= self.cfg.max_batch:
                outcomes += self._run_batch(queue)
        if queue:
            outcomes += self._run_batch(queue)
        return [outcome for outcome in outcomes if outcome != "queued"], list(self._sweep(entries))

    # -- intake=queue ---------------------------------------------------------------------------

    def _from_queue(self, intake: EventQueue) -> tuple[list[str], list[str], int]:
        """A tick driven by Event Grid's events (:mod:`mpistyle.watch.intake`): a listing first
        when one is due (:meth:`_reconcile`), then up to ``queue_messages_per_tick`` messages, each
        one's video carried on as far as this tick can; a message is deleted once its video is
        final (or it names nothing to do), and otherwise comes back after ``queue_revisit_s``.
        Returns the outcomes of the videos reached, the sweep's, and how many messages wait for
        a later tick (this one past ``tick_time_limit_s``)."""
        outcomes, swept = self._reconcile()
        messages = intake.receive(self.cfg.queue_messages_per_tick, self.cfg.lease_s)
        taken: list[Taken] = []
        queue: list[Queued] | None = [] if self.cfg.max_batch > 1 else None
        with intake.keeping(self.cfg.lease_s) as held:
            held.extend(messages)
            for message in self._within_tick_limit(messages):
                item = Taken(message)
                item.outcome = self._guarded(f"queue message {message.id}", partial(self._take, item, queue))
                taken.append(item)
                if queue is not None and len(queue) >= self.cfg.max_batch:
                    outcomes += self._run_batch(queue)
            if queue:
                outcomes += self._run_batch(queue)
            for message in messages[len(taken) :]:  # past tick_time_limit_s: back at once, not counted against it
                taken.append(Taken(message, outcome="later"))
            for item in taken:
                held.remove(item.message)
                self._guarded(f"queue message {item.message.id}", partial(self._settle, intake, item))
        reached = outcomes + [item.outcome for item in taken if item.outcome not in ("queued", "later")]
        return [outcome for outcome in reached if outcome != "queued"], swept, sum(item.outcome == "later" for item in taken)

    def _take(self, item: Taken, queue: list[Queued] | None) -> str:
        """Carry on the video ``item``'s message names (its blob's current version: the event
        may be a duplicate, older than the blob, or about a blob deleted since)."""
        try:
            item.event = read(item.message)
            created = blob_created(item.event.event, _container_url(self.input), _prefix(self.input))
        except Unusable as why:
            log.warning("queue message %s ignored: %s", item.message.id, why)
            return "ignored"
        name = created.name
        if self.cfg.style_images and name.startswith(self.cfg.style_images):
            return "ignored"  # a picture for model.style_image: read with the video that names it
        if sidecar.is_sidecar(name):
            name = name.removesuffix(sidecar.SUFFIX)  # its video's settings changed: a new version of it
        try:
            entry = self.input.version(name)
        except UnsafeName:
            # Never read: quarantined by its name alone, as a listing would have it.
            entry = Entry(name, created.etag or created.event_id, 0)
        if entry is None:
            log.info("%s: gone before its event was read", redact(shown(name)))
            return "gone"
        self._sidecars.pop(entry.name, None)
        if not sidecar.is_sidecar(entry.name):
            try:
                settings = self.input.version(entry.name + sidecar.SUFFIX)
            except UnsafeName:
                settings = None
            if settings is not None:
                self._sidecars[entry.name] = settings
        item.key = self._key(entry)
        # Receives nobody accounted for: a watcher that died (or was killed) holding it.
        lost = item.message.dequeue_count - 1 - item.event.revisits
        poison = None
        if lost >= self.cfg.max_attempts:
            poison = (
                f"the watcher stopped {lost} times while working on it (a crash, a kill or running out of memory)",
                "look at the watcher's log around those times; upload it again once the cause is fixed",
            )
        return self.advance(entry, queue, poison)

    def _settle(self, intake: EventQueue, item: Taken) -> str:
        """Delete ``item``'s message once its video is final or it names nothing to follow;
        otherwise make it visible again after ``queue_revisit_s``, its revisit counted. Returns
        which ("deleted", "back", or "let go": another receive holds it now)."""
        if item.outcome == "later":
            try:
                event = read(item.message)
            except Unusable:
                return "back"  # the next tick reads it, and ignores it
            return "back" if intake.hide(item.message, 0, revisited(event)) else "let go"
        if item.outcome in ("ignored", "gone") or item.event is None:
            return "deleted" if intake.delete(item.message) else "let go"
        if item.key is not None:
            found = self.work.read_json(f"state/{item.key}.json")
            if found is not None and found[0].get("step") in FINAL:
                return "deleted" if intake.delete(item.message) else "let go"
        # Not final, or not even looked up (storage failed): a later tick tries again.
        return "back" if intake.hide(item.message, self.cfg.queue_revisit_s, revisited(item.event)) else "let go"

    def _reconcile(self) -> tuple[list[str], list[str]]:
        """Every ``reconcile_every_s``, list the input as ``intake=list`` does, for events that
        never came (an upload before the subscription, an event Event Grid gave up on) and for
        the sweep. Only the blobs written since the last listing (less ``lease_s`` for clocks)
        are carried on: an older one was listed then, or its message follows it."""
        record = "intake/reconciled.json"
        found = self.work.read_json(record)
        last = float(found[0].get("listed_at", 0)) if found else 0.0
        if found and time.time() - last < self.cfg.reconcile_every_s:
            return [], []
        started = time.time()
        entries = self._videos(self.input.list())
        since_ns = int((last - self.cfg.lease_s) * 1e9) if last else 0
        fresh = [entry for entry in entries if max(entry.modified, self._settings_modified(entry)) >= since_ns]
        log.info("reconciling: %d blob(s) listed, %d written since the last listing", len(entries), len(fresh))
        outcomes = self._listed(entries, fresh)
        data = {"listed_at": started, "by": self.owner, "at": _now()}
        try:
            if found is None:
                self.work.create_json(record, data)
            else:
                self.work.replace_json(record, data, found[1])
        except StateConflict:
            pass  # another watcher listed at the same time
        return outcomes

    def _videos(self, listed: list[Entry]) -> list[Entry]:
        """The listed names the tick takes on (a video, or a name to refuse): not the settings
        files (kept, by their video's name, for its job key) nor the pictures in style_images."""
        self._sidecars = {e.name.removesuffix(sidecar.SUFFIX): e for e in listed if sidecar.is_sidecar(e.name)}
        folder = self.cfg.style_images
        return [e for e in listed if not sidecar.is_sidecar(e.name) and not (folder and e.name.startswith(folder))]

    def _settings_modified(self, entry: Entry) -> int:
        settings = self._sidecars.get(entry.name)
        return settings.modified if settings is not None else 0

    def _key(self, entry: Entry) -> str:
        """The job key of this version of the video: its name and etag, and its settings file's
        etag, so that a changed settings file is a new version (a new job)."""
        settings = self._sidecars.get(entry.name)
        return job_name(entry.name, entry.etag if settings is None else f"{entry.etag}\0settings\0{settings.etag}")

    def _guarded(self, name: str, work: Callable[[], str]) -> str:
        """``work``'s outcome for the video ``name``, or "error", logged: one bad video (name,
        record, storage hiccup) never stops the queue."""
        try:
            return work()
        except Exception as err:
            log.error("%s: %s", redact(shown(name)), redact(first_line(err)))
            return "error"

    def _within_tick_limit(self, entries: list[T]) -> Iterator[T]:
        """The tick's videos (or messages) until ``tick_time_limit_s`` has passed, then no more
        (the first is always taken, so every tick moves something): a long backlog, or slow
        storage, must not hold the tick, and the tick script's lock, for hours."""
        deadline = time.monotonic() + self.cfg.tick_time_limit_s
        for index, entry in enumerate(entries):
            if index and time.monotonic() > deadline:
                log.warning("tick: past tick_time_limit_s=%g; %d video(s) wait for the next tick",
                            self.cfg.tick_time_limit_s, len(entries) - index)
                return
            yield entry

    # -- one video ------------------------------------------------------------------------------

    def advance(self, entry: Entry, queue: list[Queued] | None = None, poison: tuple[str, str] | None = None) -> str:
        """Move the video on as far as this tick can. With ``queue``, a video ready to start is
        put on it instead, its claim still held, for :meth:`_run_batch` ("queued"). With
        ``poison`` (a reason and what to do), it is quarantined instead, once claimed."""
        key = self._key(entry)
        record = f"state/{key}.json"
        lease_until = time.time() + self.cfg.lease_s
        existing = self.work.read_json(record)
        settings = self._sidecars.get(entry.name)
        if existing is None:
            if settings is None and time.time_ns() - entry.modified < self.cfg.settings_wait_s * 1e9:
                return "waiting"  # its settings file may be on its way (settings_wait_s)
            data = {
                "input": entry.name, "etag": entry.etag, "size": entry.size, "key": key, "job": None, "step": "claimed",
                "owner": self.owner, "lease_until": lease_until, "attempts": 0, "created": _now(),
                "history": [{"step": "claimed", "at": _now()}], "settings_etag": settings.etag if settings else None,
            }
            etag = self.work.create_json(record, data)
            if etag is None:
                return "taken"  # another watcher created it a moment ago
            claim = Claim(self.work, record, data, etag)
            self.metrics.claimed.add(1)
            log.info("%s: claimed as %s", redact(shown(entry.name)), key)
        else:
            data, etag = existing
            if data["step"] in FINAL:
                self._clean_local(key)
                return data["step"]
            waiting = backing_off(data, self.cfg.retry_alert, time.time())
            if waiting is not None:
                return waiting  # no claim, no write
            if data["owner"] != self.owner and data["lease_until"] > time.time():
                return "busy"  # another watcher is working on it right now (a Slurm job it
                # handed over has lease 0: anyone may follow that)
            claim = Claim(self.work, record, data, etag)
            try:
                claim.update(owner=self.owner, lease_until=lease_until)
            except StateConflict:
                return "taken"
        with ExitStack() as held:
            held.callback(self._release, claim)
            held.enter_context(self._heartbeat(claim))
            try:
                refusal = poison or self._refusal(entry)
                if refusal is not None:
                    # Never downloaded: neither its bytes nor its name go anywhere but quarantine.
                    reason, what_to_do = refusal
                    self._quarantine(claim, entry, key, reason, None, what_to_do, cause="watcher" if poison else "name")
                    self._clean_local(key)
                    return claim.data["step"]
                outcome = self._run_steps(claim, entry, key, batching=queue is not None, joining=bool(queue))
            except StateConflict:
                log.warning("%s: another watcher took over; leaving it to them", redact(shown(entry.name)))
                return "taken"
            if outcome == "queued":
                assert queue is not None
                queue.append(Queued(claim, entry, key, held.pop_all()))
            return outcome

    def _release(self, claim: Claim) -> None:
        """Give the lease up when this tick stops working on the video, finished or not, so the
        next tick (any watcher) can go on at once instead of waiting for the lease to run out."""
        if claim.data["step"] in FINAL or claim.data.get("lease_until", 0) == 0 or claim.data["owner"] != self.owner:
            return
        try:
            claim.update(lease_until=0)
        except (StateConflict, MpistyleError):
            pass  # someone else holds it now, or storage is down: the lease runs out by itself

    def _input_copy(self, key: str, name: str) -> Path:
        """Where this host keeps its copy of the input: made from the job key alone, never read
        back from a record (a record is data anyone with work-area access can write)."""
        return self.workdir / key / f"input{suffix_of(name)}"

    def _run_steps(self, claim: Claim, entry: Entry, key: str, batching: bool = False, joining: bool = False) -> str:
        """Move the video on, step by step, to a final state or to one that waits for a later
        tick (returned: "waiting", "held", "running", "failed", "retrying", "stuck"), or,
        ``batching``, to the start of a job it shares with others ("queued"; ``joining``: one
        that others already wait for)."""
        while claim.data["step"] not in FINAL:
            step = claim.data["step"]
            if step == "staged" and not self._staged_here(claim, entry, key):
                claim.update(step="claimed")  # the local copy is gone (another host, a wiped workdir)
                continue
            if step == "finished" and not (self.workdir / key / "output.mp4").is_file():
                claim.update(step="staged")  # the finished video is gone from this host: score it again
                continue
            paused: str | None = None
            if step == "claimed":
                # Not downloaded while no job could start: a flood of uploads waits in the input area.
                paused = self._held(joining) or self._stage(claim, entry, key)
            elif step == "staged":
                paused = self._start(claim, entry, key, batching, joining)
            elif step == "submitted":
                paused = self._follow(claim, entry, key)
            elif step == "finished":
                self._deliver(claim, entry, key)
            else:
                raise StorageError(f"state record {claim.name} has an unknown step {step!r}")
            if paused is not None:
                return paused
        self._clean_local(key)
        return claim.data["step"]

    def _stage(self, claim: Claim, entry: Entry, key: str) -> str | None:
        """Download the input, with its settings file and style image, to this host and check
        them as its job will (the settings, the probe and the limits), so that what the job
        would refuse is quarantined here and never takes a place in the cluster's queue.
        "waiting" if its settings file changed meanwhile: that is a new version, for the next tick."""
        local = self.workdir / key
        local.mkdir(parents=True, exist_ok=True)
        limits = self._job_limits()
        try:
            settings = self._fetch_settings(entry, key)
            if settings is None:
                return "waiting"
            if limits.bytes is not None and entry.size > limits.bytes:
                raise _Refused(f"input is {entry.size} bytes, over limits.bytes={limits.bytes} (never downloaded)",
                               _WITHIN_LIMITS)
            self._fetch_style_image(settings, entry, key, limits)
            copy = self._input_copy(key, entry.name)
            self.input.download(entry.name, copy)
            try:
                probe(str(copy), limits)
            except InputError as err:
                raise _Refused(str(err).replace(str(copy), entry.name), _WITHIN_LIMITS) from None
        except _Refused as refused:
            self._quarantine(claim, entry, key, refused.reason, InputError.exit_code, refused.what_to_do, cause="input")
            return None
        if settings.shown():
            log.info("%s: its own settings: %s", redact(shown(entry.name)), redact(json.dumps(settings.shown())))
        claim.update(step="staged", settings=settings.shown() or None)
        return None

    def _job_limits(self) -> Limits:
        """The jobs' own limits (limits.* of the config job_overrides make), which the probe
        before any job applies too: one set of numbers."""
        if self._limits is None:
            self._limits = Limits(**plain(watch_config.job_config(self.cfg.job_overrides).limits))
        return self._limits

    def _fetch_settings(self, entry: Entry, key: str) -> sidecar.Settings | None:
        """The video's settings from its settings file (none without one), downloaded and
        checked against the allow-list and the job's config; None if the file changed since the
        listing (a new version of the video)."""
        listed = self._sidecars.get(entry.name)
        copy = self.workdir / key / "settings.json"
        if listed is None:
            copy.unlink(missing_ok=True)
            return sidecar.Settings()
        name = sidecar.sidecar_of(entry.name)
        what_to_do = f"fix the settings file {shown(name)} (docs/watch.md) and upload it again: a new settings file is a new job"
        if listed.size > sidecar.MAX_BYTES:  # never downloaded
            raise _Refused(f"the settings file {shown(name)} is {listed.size} bytes; a settings file is at most "
                           f"{sidecar.MAX_BYTES}", what_to_do)
        current = self.input.version(name)
        if current is None or current.etag != listed.etag:
            return None
        self.input.download(name, copy)
        try:
            settings = self._settings(key, name)
            if settings.values or settings.model:
                # Composed as the job will compose it: a setting its config cannot take, or a
                # value it refuses, would fail the job with exit 2, which is retried for ever.
                style = self._style_copy(key, settings)
                try:
                    job_cfg = watch_config.job_config([*settings.choice(), *self.cfg.job_overrides, *settings.overrides(style)])
                except ConfigError as err:
                    raise InputError(f"the settings file {shown(name)} sets what the jobs here cannot take: {err}") from None
                sidecar.check_job(job_cfg, settings, name)
        except InputError as err:
            raise _Refused(str(err), what_to_do) from None
        return settings

    def _settings(self, key: str, name: str = "settings.json") -> sidecar.Settings:
        """The video's settings, from the copy of its settings file (``name``) on this host
        (none without one)."""
        copy = self.workdir / key / "settings.json"
        if not copy.is_file():
            return sidecar.Settings()
        cfg = self.cfg
        return sidecar.parse(copy.read_bytes(), name, cfg.settings_allowed, cfg.settings_models, cfg.style_images)

    def _line_settings(self, key: str) -> dict[str, Any]:
        """The video's own settings, for its line in a batch's JSONL file."""
        settings = self._settings(key)
        return settings.line(self._style_copy(key, settings))

    def _style_copy(self, key: str, settings: sidecar.Settings) -> Path | None:
        """Where this host keeps the copy of the video's style image (None: it has none)."""
        image = settings.style_image
        return self.workdir / key / f"style{suffix_of(image)}" if image is not None else None

    def _fetch_style_image(self, settings: sidecar.Settings, entry: Entry, key: str, limits: Limits) -> None:
        """Download the picture the video's settings name, checked as its job will read it (a
        picture within limits.pixels), from the input area's style_images folder."""
        image, copy = settings.style_image, self._style_copy(key, settings)
        if image is None or copy is None:
            return
        what_to_do = (f"upload the picture to {shown(image)} in the input area (a PNG, JPEG or WebP of at most "
                      f"{sidecar.STYLE_IMAGE_MAX_BYTES} bytes), then the settings file again: a new settings file is a new job")
        try:
            found = self.input.version(image)
        except UnsafeName as err:
            raise _Refused(f"its style image cannot be named so: {err.why}", what_to_do) from None
        if found is None:
            raise _Refused(f"its settings name the style image {shown(image)}, which is not in the input area", what_to_do)
        if found.size > sidecar.STYLE_IMAGE_MAX_BYTES:
            raise _Refused(f"its style image {shown(image)} is {found.size} bytes, over {sidecar.STYLE_IMAGE_MAX_BYTES}",
                           what_to_do)
        self.input.download(image, copy)
        try:
            probe_picture(str(copy), Limits(bytes=sidecar.STYLE_IMAGE_MAX_BYTES, pixels=limits.pixels))
        except InputError as err:
            raise _Refused(f"its style image: {str(err).replace(str(copy), shown(image))}", what_to_do) from None

    def _staged_here(self, claim: Claim, entry: Entry, key: str) -> bool:
        """Whether this host has what the video's job reads: the input's copy, and its settings
        file's and style image's where it has them."""
        if not self._input_copy(key, entry.name).is_file():
            return False
        if claim.data.get("settings_etag") is None:
            return True
        if not (self.workdir / key / "settings.json").is_file():
            return False
        try:
            style = self._style_copy(key, self._settings(key))
        except InputError:
            return False
        return style is None or style.is_file()

    def _held(self, joining: bool = False) -> str | None:
        """"held" when flood control lets no further job start this tick (the video waits, for a
        later tick); None when one may, or ``joining``: the video joins a batch about to start."""
        if joining:
            return None
        if not self._full:
            if self.cfg.max_submit_per_tick and self._started >= self.cfg.max_submit_per_tick:
                self._full = f"max_submit_per_tick={self.cfg.max_submit_per_tick} jobs started this tick"
            elif self.cfg.max_active_jobs and (active := self._active_jobs()) >= self.cfg.max_active_jobs:
                self._full = f"max_active_jobs={self.cfg.max_active_jobs}: {active} jobs queued or running"
            if self._full:
                log.info("flood control: %s; the videos still to start wait for a later tick", self._full)
        return "held" if self._full else None

    def _active_jobs(self) -> int:
        """The watchers' jobs queued or running now. A runner whose jobs outlive the tick
        (Slurm) is asked once a tick, and this tick's starts added (one squeue a tick, not one a
        video; a job that ends meanwhile frees its place for the next tick); one whose jobs end
        within it (local) each time, as only other watchers' jobs are left running."""
        if self.runner.waits:
            return self.runner.active()
        if self._active < 0:
            self._active = self.runner.active() - self._started
        return self._active + self._started

    def _start(self, claim: Claim, entry: Entry, key: str, batching: bool = False, joining: bool = False) -> str | None:
        """Start the video's next attempt (or quarantine it, past ``max_attempts``); "waiting"
        while it backs off after a failure that was not the input's; "held" while flood control
        starts no job; "queued", ``batching``, for :meth:`_run_batch` to start it with others."""
        attempts = claim.data["attempts"]  # failures that may be the input's fault
        if attempts >= self.cfg.max_attempts:
            reason = f"failed {attempts} times, the last: {claim.data.get('failure', 'unknown')}"
            self._quarantine(claim, entry, key, reason, claim.data.get("exit_code"), cause="attempts")
            return None
        if claim.data.get("retry_after", 0) > time.time():
            return "waiting"
        # A video something was held against runs alone (it cannot sink a batch), and so does
        # one that chooses its own model (a batch has one).
        alone = not batching or attempts > 0 or claim.data.get("alone") or self._settings(key).model is not None
        held = self._held(joining and not alone)
        if held is not None:
            return held
        if not alone:
            return "queued"
        job = self._job(key, entry)
        claim.update(step="submitted", job=None, batch=None, submitted_at=time.time(), started_by=self.owner)
        handle = self.runner.start(job)
        self.metrics.attempts.add(1)
        self.metrics.job_running(handle)
        self._started += 1
        claim.update(job=handle)
        log.info("%s: attempt %d started as %s", redact(shown(entry.name)), attempts + 1, handle)
        return None

    def _follow(self, claim: Claim, entry: Entry, key: str) -> str | None:
        """Wait for the video's job as long as the runner waits; "running" if it still runs."""
        batch = claim.data.get("batch")
        job = self._batch_job(batch) if batch else self._job(key, entry)
        handle: str | None = claim.data["job"] or self.runner.find(job)
        if handle is None:
            # Crashed between recording the start and starting the job, which never ran.
            claim.update(step="staged")
            return None
        if handle != claim.data["job"]:
            claim.update(job=handle)
        if self.runner.waits and claim.data.get("started_by") != self.owner:
            # A killed watcher's job runs on in its own session: wait for it, never start a second.
            log.info("%s: following %s, started by %s", redact(shown(entry.name)), handle, claim.data.get("started_by"))
        status = self.runner.wait(handle, job, claim.data.get("submitted_at"))
        if status.state == "running":
            self.metrics.job_running(handle)
            claim.update(lease_until=0)  # anyone may follow the job from here
            return "running"
        self.metrics.job_ended(handle)
        if batch:
            return self._batch_ended(claim, entry, key, status)
        if status.state == "lost" and (self.workdir / key / "output.mp4.report.json").is_file():
            # The scheduler forgot the job (aged out), but it finished: its report is there.
            status = JobStatus("done", 0)
        return self._ended(claim, entry, key, status)

    def _batch_ended(self, claim: Claim, entry: Entry, key: str, status: JobStatus) -> str | None:
        """The next step for one video of a batch job that ended, by its own outcome: its output
        and report, or its error file (judged as if its own job had ended with that code); by the
        job's end where it has neither."""
        local = self.workdir / key
        if (local / "output.mp4").is_file() and (local / "output.mp4.report.json").is_file():
            return self._ended(claim, entry, key, JobStatus("done", 0))  # however the job ended after it
        failed = _video_error(local / "output.mp4.error.json")
        if failed is not None:
            code, error = failed
            error = error.replace(str(self._input_copy(key, entry.name)), entry.name)  # its name, not this host's copy
            return self._ended(claim, entry, key, JobStatus("failed", code), error)
        if status.state == "done" or status.exit_code == SomeVideosFailed.exit_code:
            status = JobStatus("lost", detail="its batch job ended without its output or its error file")
        if blame(status) != "elsewhere":
            self.metrics.failures.add(1, {"fault": blame(status)})
            # A crash or the time limit of the whole job may be any one video's doing (or the
            # length of all of them together): held against none; each runs alone next, and a
            # failure there counts.
            log.warning("%s: its batch job failed, exit %s: %s; it runs in a job of its own next",
                        redact(shown(entry.name)), status.exit_code, redact(meaning(status)))
            claim.update(step="staged", alone=True, exit_code=status.exit_code, failure=meaning(status))
            return "failed"
        return self._ended(claim, entry, key, status)

    def _ended(self, claim: Claim, entry: Entry, key: str, status: JobStatus, error: str | None = None) -> str | None:
        """The next step after a job ended, by whose fault it failed (:func:`blame`); ``error``:
        the video's own reason, where its batch job said it."""
        if status.state == "done":
            claim.update(step="finished", exit_code=0)
            return None
        fault = blame(status)
        self.metrics.failures.add(1, {"fault": fault})
        failure = f"{meaning(status)}: {error}" if error else meaning(status)
        if fault == "input":
            self._quarantine(claim, entry, key, failure, status.exit_code, cause="input")
            return None
        if fault == "attempt":
            attempts = claim.data["attempts"] + 1
            log.warning("%s: attempt %d failed, exit %s: %s", redact(shown(entry.name)), attempts,
                        status.exit_code, redact(failure))
            claim.update(step="staged", attempts=attempts, exit_code=status.exit_code, failure=failure)
            # The next attempt waits for a later tick: one job per video per tick keeps the tick
            # within tick_time_limit_s + job_time_limit_s. The last one goes on to quarantine.
            return "failed" if attempts < self.cfg.max_attempts else None
        return self._retry_later(claim, entry, status, failure)

    def _job(self, key: str, entry: Entry) -> JobSpec:
        local = self.workdir / key
        output = local / "output.mp4"
        settings = self._settings(key)
        overrides = [
            f"input={self._input_copy(key, entry.name)}",
            f"output={output}",
            # Inside the video's own folder, so every final state removes it with the rest.
            f"staging.root={local / 'staging'}",
            # The video's own settings: its model config before the watcher's overrides (which
            # may set that model's keys), its values after them (which they override).
            *settings.choice(),
            *self.cfg.job_overrides,
            *settings.overrides(self._style_copy(key, settings)),
        ]
        return JobSpec(
            name=f"{JOB_PREFIX}{key}", overrides=overrides, log=local / "job.log", runs_dir=local / "runs", folder=local,
            time_limit_s=self.cfg.job_time_limit_s,
        )

    def _batch_job(self, name: str) -> JobSpec:
        """The batch job ``name`` (a record's ``batch``): ``inputs=`` its JSONL file, which names
        each video's input copy and output in the video's own folder, as its own job would."""
        if not _BATCH_NAME.fullmatch(str(name)):  # a record is data: never a path of its choosing
            raise StorageError(f"the state record names an unusable batch {redact(shown(str(name)))}")
        folder = self.workdir / "batches" / name
        overrides = [
            f"inputs={folder / 'jobs.jsonl'}",
            # The batch's own: a retry of the same videos (the same folder) resumes from it, and
            # _sweep_batches removes it with the rest once none of its videos is left here.
            f"staging.root={folder / 'staging'}",
            *self.cfg.job_overrides,
        ]
        return JobSpec(
            name=f"{JOB_PREFIX}batch-{name}", overrides=overrides, log=folder / "job.log", runs_dir=folder / "runs",
            folder=folder, time_limit_s=self.cfg.job_time_limit_s,
        )

    def _job_folder(self, claim: Claim, key: str) -> Path:
        """Where the video's last job keeps its log: the video's own folder, or its batch's."""
        batch = claim.data.get("batch")
        return self._batch_job(batch).folder if batch else self.workdir / key

    # -- batches ----------------------------------------------------------------------------------

    def _run_batch(self, queue: list[Queued]) -> list[str]:
        """Start the queued videos as one job, then take each on from there on its own, as
        :meth:`advance` would (follow the job, judge its own outcome, deliver). Empties ``queue``;
        returns the videos' outcomes."""
        members, queue[:] = list(queue), []
        try:
            started = self._start_batch(members)
        except Exception as err:  # storage or scheduler: records left "submitted" without a job go back to staged
            log.error("a batch of %d videos did not start: %s", len(members), redact(first_line(err)))
            for member in members:
                member.held.close()
            return ["error"] * len(members)
        outcomes = ["taken"] * (len(members) - len(started))
        for member in started:
            outcomes.append(self._guarded(member.entry.name, partial(self._go_on, member)))
        return outcomes

    def _start_batch(self, queue: list[Queued]) -> list[Queued]:
        """Start one job for the queued videos; returns those whose records say so (the others
        another watcher took meanwhile). A batch of one is a job of its own, as without batches."""
        if len(queue) == 1:
            batch, job = None, self._job(queue[0].key, queue[0].entry)
        else:
            # Named by its videos: the same videos again (a retry) find their staged segments.
            batch = hashlib.sha256(" ".join(sorted(member.key for member in queue)).encode()).hexdigest()[:16]
            job = self._batch_job(batch)
        # Recorded first: a watcher killed from here on leaves records the next tick takes back
        # to staged (no job found) or on to the job (found by its name or runs folder).
        members = self._record_all(queue, step="submitted", job=None, batch=batch, submitted_at=time.time(),
                                   started_by=self.owner)
        if not members:
            return []
        if batch is not None:
            lines = [{"input": str(self._input_copy(m.key, m.entry.name)), "output": str(self.workdir / m.key / "output.mp4"),
                      **self._line_settings(m.key)} for m in members]
            job.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(job.folder / "jobs.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
            for member in members:  # an earlier batch's verdict, never to be taken for this one's
                (self.workdir / member.key / "output.mp4.error.json").unlink(missing_ok=True)
        handle = self.runner.start(job)
        self.metrics.attempts.add(len(members))
        self.metrics.job_running(handle)
        self._started += 1
        members = self._record_all(members, job=handle)
        for member in members:
            log.info("%s: attempt %d started as %s%s", redact(shown(member.entry.name)), member.claim.data["attempts"] + 1,
                     handle, f" (batch {batch} of {len(members)})" if batch else "")
        return members

    def _record_all(self, queue: list[Queued], **changes: Any) -> list[Queued]:
        """Record ``changes`` in each queued video's record; returns those that took them (the
        others were taken over by another watcher: let go)."""
        kept = []
        for member in queue:
            try:
                member.claim.update(**changes)
                kept.append(member)
            except StateConflict:
                log.warning("%s: another watcher took over; leaving it to them", redact(shown(member.entry.name)))
                member.held.close()
        return kept

    def _go_on(self, member: Queued) -> str:
        """One video of a job just started, on from "submitted"; its claim is given up after."""
        with member.held:
            try:
                return self._run_steps(member.claim, member.entry, member.key)
            except StateConflict:
                log.warning("%s: another watcher took over; leaving it to them", redact(shown(member.entry.name)))
                return "taken"

    def _sweep_batches(self) -> None:
        """Remove each batch folder (its JSONL file, log and staging) once none of its videos has
        a folder here any more (every final state removes the video's): all have ended."""
        for folder in (self.workdir / "batches").glob("*"):
            try:
                lines = (folder / "jobs.jsonl").read_text().splitlines()
                keys = {Path(json.loads(line)["output"]).parent.name for line in lines if line.strip()}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not written yet (or not ours): left alone
            if not any((self.workdir / key).exists() for key in keys):
                shutil.rmtree(folder, ignore_errors=True)

    def _retry_later(self, claim: Claim, entry: Entry, status: JobStatus, failure: str) -> str:
        """A job that failed through no fault of its input: stop the video for this tick and
        retry it on a later one, waiting twice as long after each such failure. Never counted as
        an attempt, never quarantined: a full staging area or a failed node is no reason to give
        a good video up (nor to delete the inbox copy)."""
        retries = claim.data.get("retries", 0) + 1
        delay = min(self.cfg.retry_backoff_max_s, self.cfg.retry_backoff_s * 2 ** min(retries - 1, 40))
        claim.update(
            step="staged", exit_code=status.exit_code, failure=failure, retries=retries, retry_after=time.time() + delay
        )
        if retries >= self.cfg.retry_alert:
            # Still never quarantined (not the input's fault), but no longer quiet: the tick exits 9.
            log.error("%s: job failed %d times for reasons that are not the input's (last: exit %s, %s); "
                      "retry in %.0f s; look at logs/%s/ in the work area", redact(shown(entry.name)), retries,
                      status.exit_code, redact(failure), delay, claim.data["key"])
            return "stuck"
        log.warning("%s: job failed, exit %s: %s; not the input's fault, retry %d in %.0f s",
                    redact(shown(entry.name)), status.exit_code, redact(failure), retries, delay)
        return "retrying"

    def _refusal(self, entry: Entry) -> tuple[str, str] | None:
        """Why ``entry`` is not taken at all (its reason and what to do), or None. Checked
        before any download, so a name that could never be delivered costs nothing."""
        try:
            self.input.check(entry.name)
            target = output_name(entry.name)
            for suffix in ("", *_SIDE_FILES):
                self.output.check(target + suffix)
        except UnsafeName as err:
            return f"unusable name: {err}", (
                "rename it (no control characters or backslashes, no empty, '.' or '..' parts, parts of at most "
                "255 bytes and the whole name at most 1024 bytes with the '.mp4' and '.report.json' the output "
                "names add) and upload it again"
            )
        # Only names of single-file video formats: FFmpeg would also open playlists (.m3u8),
        # concat lists and the like, which read other files or URLs (see formats.py).
        if PurePosixPath(entry.name).suffix.lower() not in VIDEO_SUFFIXES:
            return f"not a video name: only names ending in {', '.join(VIDEO_SUFFIXES)} (any case) are taken", (
                "upload the video under a name with one of those endings"
            )
        return None

    def _deliver(self, claim: Claim, entry: Entry, key: str) -> None:
        local = self.workdir / key
        target = output_name(entry.name)
        # One record per output name says which input it belongs to: distinct inputs that map
        # to one output (x.mov and x.mov.mp4), or an older upload finishing late, never overwrite.
        ticket = f"delivered/{hashlib.sha256(target.encode()).hexdigest()}.json"
        held = self.work.read_json(ticket)
        if held is not None and held[0].get("input") != entry.name:
            other = redact(shown(str(held[0].get("input"))))
            self._quarantine(
                claim, entry, key, f"its output name {redact(shown(target))} is already taken by the input {other}", None,
                "rename one of the two inputs and upload it again", cause="output_name",
            )
            return
        newer = self._newer_upload(entry, held[0] if held else None, claim.data.get("settings_etag"))
        if newer is not None:
            claim.update(step="superseded", reason=newer)
            log.info("%s: not delivered: %s", redact(shown(entry.name)), newer)
            return
        mine = {"output": target, "input": entry.name, "etag": entry.etag, "modified": entry.modified, "key": key,
                "delivered": _now()}
        if held is None:
            if self.work.create_json(ticket, mine) is None:
                raise StateConflict(ticket)  # another watcher delivers to this name right now: next tick
        else:
            self.work.replace_json(ticket, mine, held[1])
        report = self._public_report(local / "output.mp4.report.json", entry, key, target)
        if report is not None:
            self.output.upload(target + ".report.json", report)
        if (local / "output.mp4.preview.png").exists():
            self.output.upload(target + ".preview.png", local / "output.mp4.preview.png")
        # The video last: its arrival is the signal that everything is there.
        self.output.upload(target, local / "output.mp4")
        self._upload_logs(key, self._job_folder(claim, key))
        claim.update(step="done", output=target)
        self.metrics.done.add(1)
        if report is not None:
            self.metrics.delivered(json.loads(report.read_text()))  # the public one: what a user sees too
        log.info("%s: done -> %s", redact(shown(entry.name)), redact(shown(target)))
        if self.cfg.delete_inputs:
            self._delete_input(claim, entry)

    def _newer_upload(self, entry: Entry, held: dict[str, Any] | None, settings_etag: str | None = None) -> str | None:
        """Why this version must not be delivered because a newer one of the same name exists.

        The name's current version is the newest (storage keeps one per name), so if it is ours,
        and so is its settings file (``settings_etag``: none, or the one the job had), ours goes
        out. If the name is gone (deleted, maybe by ``delete_inputs`` after a newer version's
        delivery), the delivery record says whether a newer version went out."""
        current = self.input.version(entry.name)
        if current is not None:
            if current.etag != entry.etag:
                return "a newer upload of the same name replaced it"
            if self._settings_etag(entry.name) != settings_etag:
                return "its settings file was replaced or removed since: that version is a new job"
            return None
        if held is not None and held.get("etag") != entry.etag and int(held.get("modified") or 0) > entry.modified:
            return "a newer upload of the same name was delivered"
        return None

    def _settings_etag(self, video: str) -> str | None:
        """The etag of the video's settings file now (None: it has none)."""
        try:
            current = self.input.version(sidecar.sidecar_of(video))
        except StorageError:
            return None  # a name no area takes (too long with .json): there is none
        return current.etag if current is not None else None

    def _delete_input(self, claim: Claim, entry: Entry) -> None:
        """``delete_inputs``: the version of the video done or quarantined, and of its settings file."""
        self.input.delete(entry.name, entry.etag)
        if claim.data.get("settings_etag"):
            self.input.delete(sidecar.sidecar_of(entry.name), claim.data["settings_etag"])

    def _public_report(self, full: Path, entry: Entry, key: str, target: str) -> Path | None:
        """Keep the job's own report in the work area; return a copy fit for users (no paths,
        host names or run ids), or None when the job left no readable report."""
        if not full.is_file():
            return None
        self.work.upload(f"logs/{key}/report.json", full)
        try:
            report = public_report(json.loads(full.read_text()))
        except (ValueError, AttributeError) as err:
            log.warning("%s: the job's report is unreadable, delivered without it: %s", redact(shown(entry.name)), err)
            return None
        report["input"] = {**report.get("input", {}), "name": PurePosixPath(entry.name).name}
        report["output"] = {**report.get("output", {}), "name": PurePosixPath(target).name}
        if report.get("preview"):
            report["preview"] = PurePosixPath(target).name + ".preview.png"
        public = full.with_name("public.report.json")
        public.write_text(json.dumps(report, indent=2) + "\n")
        return public

    def _quarantine(
        self, claim: Claim, entry: Entry, key: str, reason: str, exit_code: int | None,
        what_to_do: str = "fix or replace the input and upload it again (a new upload is a new job)", *, cause: str,
    ) -> None:
        """Copy the input (where this host has it) and a record a person can read to quarantine;
        ``cause`` is the reason in one word, for the metrics."""
        local = self.workdir / key
        copy = self._input_copy(key, entry.name)
        kept = copy.is_file()
        if kept:
            # A fixed name: the input's own (say "error.json") could overwrite the record below.
            self.work.upload(f"quarantine/{key}/{copy.name}", copy)
        if (local / "settings.json").is_file():  # its settings file, as it was read
            self.work.upload(f"quarantine/{key}/settings.json", local / "settings.json")
        tail = ""
        job_log = self._job_folder(claim, key) / "job.log"
        if job_log.exists():
            tail = "\n".join(job_log.read_text(errors="replace").splitlines()[-20:])
        record = {
            "input": entry.name,
            "reason": reason,
            "exit_code": exit_code,
            "attempts": claim.data["attempts"],
            "quarantined": _now(),
            "what_to_do": what_to_do,
            "log_tail": redact(tail),
        }
        error_file = local / "error.json"
        local.mkdir(parents=True, exist_ok=True)
        error_file.write_text(json.dumps(record, indent=2) + "\n")
        self.work.upload(f"quarantine/{key}/error.json", error_file)
        self._upload_logs(key, self._job_folder(claim, key))
        claim.update(step="quarantined", reason=reason, exit_code=exit_code)
        self.metrics.quarantined.add(1, {"reason": cause})
        log.warning("%s: quarantined (%s)", redact(shown(entry.name)), redact(reason))
        if self.cfg.delete_inputs and kept:
            # Only once its copy is in quarantine: a name refused unread (not a video name, or
            # unusable) stays where it is, the one copy there is.
            self._delete_input(claim, entry)

    def _upload_logs(self, key: str, folder: Path) -> None:
        """The log of the video's last job (in ``folder``: its own, or its batch's), to the work area."""
        logs = [folder / "job.log", folder / "batch-report.json", *sorted((folder / "runs").glob("*/mpistyle.log"))]
        for path in logs:
            if path.is_file():
                name = path.name if path.parent == folder else f"{path.parent.name}-{path.name}"
                self.work.upload(f"logs/{key}/{name}", path)

    def _clean_local(self, key: str) -> None:
        shutil.rmtree(self.workdir / key, ignore_errors=True)

    # -- records nobody advances any more ---------------------------------------------------------

    def _sweep(self, listed: list[Entry]) -> Iterator[str]:
        """A record whose input version is no longer listed (deleted, or replaced by a new
        upload: a new job) is never advanced again. Once unchanged for ``sweep_after_s``, end it:
        a running one becomes ``abandoned`` with its local files removed; a final one is deleted
        (its quarantine copy and logs stay)."""
        current = {self._key(entry) for entry in listed}
        cutoff = time.time_ns() - int(self.cfg.sweep_after_s * 1e9)
        for record in self.work.list("state/"):
            key = record.name.removeprefix("state/").removesuffix(".json")
            if record.name != f"state/{key}.json" or not is_job_key(key) or key in current or record.modified > cutoff:
                continue
            try:
                outcome = self._sweep_one(record, key)
            except Exception as err:  # one bad record never stops the sweep
                outcome = "error"
                log.error("sweeping %s: %s", redact(shown(record.name)), redact(first_line(err)))
            if outcome is not None:
                yield outcome

    def _sweep_one(self, record: Entry, key: str) -> str | None:
        found = self.work.read_json(record.name)
        if found is None:
            return None
        data, etag = found
        try:
            current = self.input.version(str(data.get("input")))
        except StorageError:
            current = None  # a name no area takes: it cannot be listed, so it is gone
        if (current is not None and current.etag == data.get("etag")
                and self._settings_etag(str(data.get("input"))) == data.get("settings_etag")):
            return None  # still there: the listing missed it (an unreadable folder), it is not gone
        if data.get("step") in FINAL:
            self._clean_local(key)
            self.work.delete(record.name, record.etag)  # only the version listed: not one changed since
            return "swept"
        if data.get("owner") != self.owner and float(data.get("lease_until") or 0) > time.time():
            return None  # a live watcher works on it (its input may have gone only just now)
        try:
            Claim(self.work, record.name, data, etag).update(
                step="abandoned", reason="its input was deleted or replaced by a new upload", owner=self.owner, lease_until=0
            )
        except StateConflict:
            return None  # someone changed it just now: not stale after all
        self._clean_local(key)
        log.info("%s: abandoned: its input %s is gone", key, redact(shown(str(data.get("input")))))
        return "abandoned"

    @contextmanager
    def _heartbeat(self, claim: Claim) -> Iterator[None]:
        """Renew the claim's lease while this watcher works on it (a download or a local run
        can outlast it)."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.cfg.lease_s / 3):
                try:
                    if claim.data.get("lease_until", 0) > 0:
                        claim.update(lease_until=time.time() + self.cfg.lease_s)
                except (StateConflict, MpistyleError) as err:
                    log.warning("could not renew the lease on %s: %s", claim.name, redact(str(err)))

        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _container_url(area: Area) -> str:
    if not isinstance(area, BlobArea):
        raise ConfigError("intake=queue needs the input area in blob storage (storage=blob)")
    return str(area.client.url)


def _prefix(area: Area) -> str:
    return str(getattr(area, "prefix", ""))


def _video_error(path: Path) -> tuple[int, str] | None:
    """A batch job's verdict on one video that failed alone (``<output>.error.json``): its exit
    code and one-line reason, or None if there is none (or it is unreadable)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    code, error = (found.get("exit_code"), found.get("error")) if isinstance(found, dict) else (None, None)
    if not isinstance(code, int) or isinstance(code, bool) or code <= 0 or not isinstance(error, str):
        return None
    return code, error


def make_runner(cfg: DictConfig) -> Runner:
    """The runner ``cfg`` (the whole watch config) asks for."""
    runner = cfg.runner
    hidden, passed = frozenset(watch_config.credential_names(cfg.storage)), frozenset(runner.env_pass)
    if runner.kind == "local":
        return LocalRunner(ranks=runner.ranks, python=runner.python or sys.executable, env_pass=passed, hidden_env=hidden,
                           kill_grace_s=cfg.job_kill_grace_s)
    if runner.kind == "slurm":
        script = Path(runner.script).expanduser() if runner.script else DEFAULT_SBATCH_SCRIPT
        if not script.is_file():
            raise ConfigError(f"sbatch script not found: {script} (set runner.script)")
        return SlurmRunner(script=script, sbatch_args=list(runner.sbatch_args), env_pass=passed, hidden_env=hidden,
                           kill_grace_s=cfg.job_kill_grace_s)
    raise ConfigError(f"runner.kind must be local or slurm, not {runner.kind!r}")


def tick_every(watcher: Watcher, seconds: float) -> None:
    """Tick until SIGTERM or SIGINT, each tick starting ``seconds`` after the last began (at
    once if it took longer). A tick that fails as a whole (storage down) is logged and counted,
    and the next one tries again."""
    # SIGTERM (systemctl stop, kill) stops it as Ctrl-C does: the tick under way gives its claims
    # up (its jobs run on, to be followed, as a killed watcher's are) and the last figures go out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            began = time.monotonic()
            try:
                watcher.tick()
            except MpistyleError as err:
                log.error("tick: %s", redact(first_line(err)))
            time.sleep(max(0.0, began + seconds - time.monotonic()))
    except KeyboardInterrupt:
        log.info("stopped")


@hydra.main(config_path="pkg://mpistyle.configs", config_name="watch", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [mpistyle-watch] %(levelname)s %(message)s", stream=sys.stderr)
    # The Azure SDK logs request URLs; keep it to warnings (and our messages are redacted).
    logging.getLogger("azure").setLevel(logging.WARNING)
    try:
        watch_config.check(cfg)
        areas = {label: open_area(label, cfg.storage[label]) for label in watch_config.AREAS}
        runner = make_runner(cfg)
        intake = EventQueue(cfg.storage.queue.url, cfg.storage.queue.credential_env) if cfg.intake == "queue" else None
        with watch_metrics.exported(cfg) as metrics:
            watcher = Watcher(cfg, areas, runner, intake=intake, metrics=metrics)
            if cfg.every is not None:
                tick_every(watcher, cfg.every)
                return
            counts = watcher.tick()
    except MpistyleError as err:
        log.error("error: %s", redact(first_line(err)))
        sys.exit(err.exit_code)
    # Non-zero when something needs a person: a storage or scheduler error, or a video whose jobs
    # keep failing for reasons that are not its own (retry_alert).
    sys.exit(StorageError.exit_code if counts.get("error") or counts.get("stuck") else 0)


def main() -> None:
    if sys.argv[1:2] == ["status"]:
        # Before Hydra, which would take "status" and the flags for overrides of its own.
        from .status import main as status_main

        status_main(sys.argv[2:])  # exits
    from ..cli import check_overrides

    watch_config.register()
    check_overrides(sys.argv[1:], "watch")
    _hydra_main()
