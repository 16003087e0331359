"""``mpistyle-watch``: one tick of the storage watcher, run by cron, a systemd timer or scrontab.

Each tick lists the input area and moves every video one or more steps along

    claimed -> staged -> submitted -> finished -> done            (or -> quarantined)

recording each step in a state record in the work area (``state/<job>.json``). Records are
created only if absent and replaced only if unchanged since read, so two watchers never take
the same video, and a watcher killed at any point leaves a record the next tick continues from:
every step is safe to repeat. A claim carries a lease that a heartbeat renews while this
watcher works on it; a dead watcher's lease runs out and another takes over. A video that is
not a video, is damaged, or fails ``max_attempts`` times is copied to ``quarantine/<job>/``
with ``error.json`` a person can read, and the others carry on.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from . import config
from .errors import InputError, MpistyleError, StorageError
from .runners import DEFAULT_SBATCH_SCRIPT, JobSpec, JobStatus, LocalRunner, Runner, SlurmRunner
from .storage.areas import Area, Entry, StateConflict, open_area
from .storage.names import job_name, output_name, suffix_of
from .storage.secrets import redact

log = logging.getLogger("mpistyle.watch")
FINAL = ("done", "quarantined")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


class Watcher:
    def __init__(self, cfg: DictConfig, areas: dict[str, Area], runner: Runner, owner: str | None = None) -> None:
        self.cfg = cfg
        self.input, self.output, self.work = areas["input"], areas["output"], areas["work"]
        self.runner = runner
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.workdir = Path(cfg.workdir).expanduser().absolute()

    def tick(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.input.list():
            try:
                outcome = self.advance(entry)
            except Exception as err:  # one bad video (name, record, storage hiccup) never stops the queue
                outcome = "error"
                text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                log.error("%s: %s", redact(repr(entry.name)[1:-1]), redact(text))
            counts[outcome] = counts.get(outcome, 0) + 1
        log.info("tick: %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no input")
        return counts

    # -- one video ------------------------------------------------------------------------------

    def advance(self, entry: Entry) -> str:
        key = job_name(entry.name, entry.etag)
        record = f"state/{key}.json"
        lease_until = time.time() + self.cfg.lease_s
        existing = self.work.read_json(record)
        if existing is None:
            data = {
                "input": entry.name, "etag": entry.etag, "size": entry.size, "key": key, "job": None, "step": "claimed",
                "owner": self.owner, "lease_until": lease_until, "attempts": 0, "created": _now(),
                "history": [{"step": "claimed", "at": _now()}],
            }
            etag = self.work.create_json(record, data)
            if etag is None:
                return "taken"  # another watcher created it a moment ago
            claim = Claim(self.work, record, data, etag)
            log.info("%s: claimed as %s", entry.name, key)
        else:
            data, etag = existing
            if data["step"] in FINAL:
                self._clean_local(key)
                return data["step"]
            if data["owner"] != self.owner and data["lease_until"] > time.time():
                return "busy"  # another watcher is working on it right now (a Slurm job it
                # handed over has lease 0: anyone may follow that)
            claim = Claim(self.work, record, data, etag)
            try:
                claim.update(owner=self.owner, lease_until=lease_until)
            except StateConflict:
                return "taken"
        try:
            with self._heartbeat(claim):
                return self._run_steps(claim, entry, key)
        except StateConflict:
            log.warning("%s: another watcher took over; leaving it to them", entry.name)
            return "taken"
        finally:
            self._release(claim)

    def _release(self, claim: Claim) -> None:
        """Give the lease up when this tick stops working on the video, finished or not, so the
        next tick (any watcher) can go on at once instead of waiting for the lease to run out."""
        if claim.data["step"] in FINAL or claim.data.get("lease_until", 0) == 0 or claim.data["owner"] != self.owner:
            return
        try:
            claim.update(lease_until=0)
        except (StateConflict, MpistyleError):
            pass  # someone else holds it now, or storage is down: the lease runs out by itself

    def _run_steps(self, claim: Claim, entry: Entry, key: str) -> str:
        local = self.workdir / key
        while claim.data["step"] not in FINAL:
            step = claim.data["step"]
            if step == "staged" and not Path(claim.data.get("local_input") or "").is_file():
                claim.update(step="claimed")  # the local copy is gone (another host, a wiped workdir)
                continue
            if step == "finished" and not (self.workdir / key / "output.mp4").is_file():
                claim.update(step="staged")  # the finished video is gone from this host: score it again
                continue
            if step == "claimed":
                local.mkdir(parents=True, exist_ok=True)
                copy = local / f"input{suffix_of(entry.name)}"
                self.input.download(entry.name, copy)
                claim.update(step="staged", local_input=str(copy))
            elif step == "staged":
                if claim.data["attempts"] >= self.cfg.max_attempts:
                    self._quarantine(claim, entry, key, f"failed {claim.data['attempts']} times", claim.data.get("exit_code"))
                    continue
                claim.update(step="submitted", job=None, attempts=claim.data["attempts"] + 1)
                handle = self.runner.start(self._job(key, claim))
                claim.update(job=handle)
                log.info("%s: attempt %d started as %s", entry.name, claim.data["attempts"], handle)
            elif step == "submitted":
                handle = claim.data["job"] or self.runner.find(self._job(key, claim).name)
                if handle is None:
                    # Crashed between recording the attempt and starting the job, which never ran.
                    claim.update(step="staged")
                    continue
                if handle != claim.data["job"]:
                    claim.update(job=handle)
                status = self.runner.poll(handle)
                if status.state == "lost" and (self.workdir / key / "output.mp4.report.json").is_file():
                    # The scheduler forgot the job (aged out), but it finished: its report is there.
                    status = JobStatus("done", 0)
                if status.state == "running":
                    claim.update(lease_until=0)  # anyone may follow the job from here
                    return "running"
                if status.state == "done":
                    claim.update(step="finished", exit_code=0)
                elif status.exit_code == InputError.exit_code:
                    self._quarantine(claim, entry, key, "the input is not a usable video", status.exit_code)
                else:
                    log.warning("%s: attempt %d %s (exit %s)", entry.name, claim.data["attempts"], status.state, status.exit_code)
                    claim.update(step="staged", exit_code=status.exit_code)
            elif step == "finished":
                self._deliver(claim, entry, key)
            else:
                raise StorageError(f"state record {claim.name} has an unknown step {step!r}")
        self._clean_local(key)
        return claim.data["step"]

    def _job(self, key: str, claim: Claim) -> JobSpec:
        local = self.workdir / key
        output = local / "output.mp4"
        overrides = [
            f"input={claim.data['local_input']}",
            f"output={output}",
            f"staging.root={self.workdir / 'staging'}",
            *self.cfg.job_overrides,
        ]
        return JobSpec(name=f"mpistyle-{key}", overrides=overrides, log=local / "job.log", runs_dir=local / "runs")

    def _deliver(self, claim: Claim, entry: Entry, key: str) -> None:
        local = self.workdir / key
        target = output_name(entry.name)
        for suffix in (".report.json", ".preview.png"):
            if (local / f"output.mp4{suffix}").exists():
                self.output.upload(target + suffix, local / f"output.mp4{suffix}")
        # The video last: its arrival is the signal that everything is there.
        self.output.upload(target, local / "output.mp4")
        self._upload_logs(key)
        claim.update(step="done", output=target)
        log.info("%s: done -> %s", entry.name, target)
        if self.cfg.delete_inputs:
            self.input.delete(entry.name, entry.etag)

    def _quarantine(self, claim: Claim, entry: Entry, key: str, reason: str, exit_code: int | None) -> None:
        local = self.workdir / key
        copy = Path(claim.data.get("local_input") or "")
        if copy.is_file():
            self.work.upload(f"quarantine/{key}/{Path(entry.name).name}", copy)
        tail = ""
        if (local / "job.log").exists():
            tail = "\n".join((local / "job.log").read_text(errors="replace").splitlines()[-20:])
        record = {
            "input": entry.name,
            "reason": reason,
            "exit_code": exit_code,
            "attempts": claim.data["attempts"],
            "quarantined": _now(),
            "what_to_do": "fix or replace the input and upload it again (a new upload is a new job)",
            "log_tail": redact(tail),
        }
        error_file = local / "error.json"
        local.mkdir(parents=True, exist_ok=True)
        error_file.write_text(json.dumps(record, indent=2) + "\n")
        self.work.upload(f"quarantine/{key}/error.json", error_file)
        self._upload_logs(key)
        claim.update(step="quarantined", reason=reason, exit_code=exit_code)
        log.warning("%s: quarantined (%s)", entry.name, reason)
        if self.cfg.delete_inputs:
            self.input.delete(entry.name, entry.etag)

    def _upload_logs(self, key: str) -> None:
        local = self.workdir / key
        logs = [local / "job.log", *sorted((local / "runs").glob("*/mpistyle.log"))]
        for path in logs:
            if path.is_file():
                name = path.name if path.parent == local else f"{path.parent.name}-{path.name}"
                self.work.upload(f"logs/{key}/{name}", path)

    def _clean_local(self, key: str) -> None:
        shutil.rmtree(self.workdir / key, ignore_errors=True)

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


# Never handed to a job, whatever the area configs name: the jobs only need local paths.
_SECRET_VARIABLES = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")


def make_runner(cfg: DictConfig, storage: DictConfig | None = None) -> Runner:
    hidden = {*_SECRET_VARIABLES, *(f"MPISTYLE_{a.upper()}_CREDENTIAL" for a in ("input", "output", "work"))}
    if storage is not None:
        hidden |= {storage[area].credential_env for area in ("input", "output", "work") if storage[area].credential_env}
    if cfg.kind == "local":
        return LocalRunner(ranks=cfg.ranks, python=cfg.python or sys.executable, hidden_env=frozenset(hidden))
    if cfg.kind == "slurm":
        script = Path(cfg.script).expanduser() if cfg.script else DEFAULT_SBATCH_SCRIPT
        if not script.is_file():
            raise StorageError(f"sbatch script not found: {script} (set runner.script)")
        return SlurmRunner(script=script, sbatch_args=list(cfg.sbatch_args), hidden_env=frozenset(hidden))
    raise StorageError(f"runner.kind must be local or slurm, not {cfg.kind!r}")


@hydra.main(config_path="pkg://mpistyle.configs", config_name="watch", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [mpistyle-watch] %(levelname)s %(message)s", stream=sys.stderr)
    # The Azure SDK logs request URLs; keep it to warnings (and our messages are redacted).
    logging.getLogger("azure").setLevel(logging.WARNING)
    try:
        areas = {label: open_area(label, cfg.storage[label]) for label in ("input", "output", "work")}
        counts = Watcher(cfg, areas, make_runner(cfg.runner, cfg.storage)).tick()
    except MpistyleError as err:
        log.error("error: %s", redact(str(err).splitlines()[0]))
        sys.exit(err.exit_code)
    sys.exit(StorageError.exit_code if counts.get("error") else 0)


def main() -> None:
    from .cli import check_overrides

    config.register()
    check_overrides(sys.argv[1:], "watch")
    _hydra_main()
