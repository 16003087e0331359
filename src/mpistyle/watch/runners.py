"""How the watcher gets a job run: submitted to Slurm (`sbatch slurm/style.sbatch`), or run
here (`mpirun -n N python -m mpistyle`). External programs sit behind this small interface;
scheduler calls are retried with backoff and fail with a message saying what to do.

A job is handed only an allow-listed part of the watcher's environment (:meth:`Runner.job_env`):
the watcher holds storage credentials, a job needs local paths only. Every job has a wall-clock
limit, and :func:`blame` says whose fault a failed job was, which decides what happens next.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import InputError, InternalError, StorageError

# Where the sbatch script lives when running from a checkout (src/mpistyle/watch/ -> slurm/);
# the config can point elsewhere.
DEFAULT_SBATCH_SCRIPT = Path(__file__).resolve().parents[3] / "slurm" / "style.sbatch"
# Every Slurm job state that means "not over yet" (held ones too: a person may release them).
_RUNNING = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "STAGE_OUT", "STOPPED", "SIGNALING", "SPECIAL_EXIT", "RESV_DEL_HOLD", "UPDATE_DB", "POWER_UP_NODE",
}
# Final Slurm states that say nothing about the input: the node, the scheduler or a person ended it.
_SLURM_ELSEWHERE = {"NODE_FAIL", "PREEMPTED", "CANCELLED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}

# What a job gets from the watcher's environment: what Python, MPI, Slurm, the GPU and mpistyle
# need. An allow-list, because the watcher's environment holds credentials under names nobody
# can list in advance (AZURE_CLIENT_SECRET, IDENTITY_HEADER, a connection string under any name).
_JOB_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "SLURM_CONF", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "XDG_CACHE_HOME",
})
# OMPI_*: mpirun as root needs OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM); MPISTYLE_*: the job's settings;
# SBATCH_*: sbatch's own defaults (partition, account); UCX_/NCCL_/FI_: the interconnect's tuning.
_JOB_ENV_PREFIXES = ("LC_", "OMPI_", "PMIX_", "TORCHINDUCTOR_", "MPISTYLE_", "SBATCH_", "UCX_", "NCCL_", "FI_")
_CREDENTIAL_NAME = re.compile(r"MPISTYLE_\w*_CREDENTIAL")  # the storage areas' default credential variables
# Never handed to a job, whatever the area configs name: the jobs only need local paths.
# Credentials of the Azure SDK and of Azure's managed identity, and the Application Insights
# connection string (or bare key) the watcher's metrics use. The job environment is an
# allow-list that keeps them (and any other) out anyway; these names are also refused in
# runner.env_pass, with every storage.*.credential_env.
SECRET_VARIABLES = (
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_HEADER", "IDENTITY_ENDPOINT", "MSI_SECRET", "MSI_ENDPOINT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING", "APPINSIGHTS_INSTRUMENTATIONKEY",
)


def is_credential_name(name: str) -> bool:
    """Whether ``name`` is one of the storage areas' default credential variables."""
    return _CREDENTIAL_NAME.fullmatch(name) is not None


# The local job's wrapper: it records the job's exit code in a file (written whole, then renamed)
# and outlives the watcher, so a later watcher learns how a job it did not start ended.
_WRAPPER = '"$@"; code=$?; echo "$code" > "$0.partial" && mv -f "$0.partial" "$0"'
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Signals a crash dies of: a decoder or model meeting something it cannot handle, which the input
# may well be (SIGKILL and SIGTERM are not here: an out-of-memory kill, scancel, preemption).
_CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}

# What an exit code means, for the log line of a failed job.
_MEANINGS = {
    1: "a bug in mpistyle or the model (traceback in the job log)",
    2: "bad configuration (check job_overrides), or a batch the device has no memory for (batch_size)",
    3: "the input is not a usable video",
    4: "the output location is unusable",
    5: "a model or checkpoint problem",
    6: "a staging area problem (disk full or unwritable)",
    7: "a rank stopped because another failed",
    9: "storage or scheduler trouble",
    126: "the job's program could not run (runner.python)",
    127: "the job's program was not found (runner.python, mpirun on PATH)",
    137: "killed by SIGKILL (often out of memory)",
}


# Every job the watcher starts is named this and its video's key (or its batch's hash), so
# that squeue tells the watchers' jobs from others.
JOB_PREFIX = "mpistyle-"


@dataclass(frozen=True)
class JobSpec:
    """One mpistyle run: the Hydra overrides plus where its files go."""

    name: str
    overrides: list[str]
    log: Path  # the job's console output
    runs_dir: Path  # mpistyle puts its run directory (with mpistyle.log) in here
    folder: Path  # the job's own folder (a local job's exit code file goes here)
    time_limit_s: float = 6 * 3600.0  # wall-clock limit; past it the job is stopped

    @property
    def exit_file(self) -> Path:
        return self.folder / "exit_code"


@dataclass(frozen=True)
class JobStatus:
    state: str  # running, done, failed, timeout (stopped at its time limit), lost
    exit_code: int | None = None
    detail: str = ""
    running_s: float | None = None  # how long it has run, where the scheduler says


def blame(status: JobStatus) -> str:
    """Whose fault a job that did not finish is, which decides what happens to its video:

    - ``input``: exit 3, the input is not a usable video: quarantine at once;
    - ``attempt``: a bug (exit 1), a crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) or the
      time limit: the input may be the reason, so it counts toward ``max_attempts``;
    - ``elsewhere``: configuration, output, model, staging, storage, a signal, an out-of-memory
      kill, a lost job, a failed node or a preemption: retried on a later tick, never held
      against the input.
    """
    if status.state == "timeout":
        return "attempt"
    if status.state == "failed" and status.detail not in _SLURM_ELSEWHERE:
        if status.exit_code == InputError.exit_code:
            return "input"
        if status.exit_code == InternalError.exit_code:
            return "attempt"
        if status.exit_code is not None and status.exit_code - 128 in {int(crash) for crash in _CRASHES}:
            return "attempt"
    return "elsewhere"


def meaning(status: JobStatus) -> str:
    """One phrase saying what a failed job's state or exit code means."""
    if status.state == "timeout":
        return status.detail or "stopped at its time limit"
    if status.state == "lost":
        return status.detail or "the job is gone and its exit code unknown"
    if status.detail in _SLURM_ELSEWHERE:
        return f"Slurm ended it as {status.detail}"
    code = status.exit_code
    if code in _MEANINGS:
        return _MEANINGS[code]
    if code is not None and 128 < code < 128 + signal.NSIG:
        return f"stopped by {signal.Signals(code - 128).name}"
    return "an unexpected exit code"


class Runner:
    env_pass: frozenset[str] = frozenset()  # extra variables handed to jobs (runner.env_pass)
    hidden_env: frozenset[str] = frozenset()  # never handed to jobs, even if allowed otherwise
    waits: ClassVar[bool] = False  # whether wait() blocks until the job ends

    def start(self, job: JobSpec) -> str:
        """Start the job; return a handle that :meth:`poll` understands (kept in the state record)."""
        raise NotImplementedError

    def poll(self, handle: str, job: JobSpec) -> JobStatus:
        """The job's state now."""
        raise NotImplementedError

    def wait(self, handle: str, job: JobSpec, submitted_at: float | None = None) -> JobStatus:
        """The job's state once this runner is done waiting for it; a job past its time limit
        is stopped and reported as ``timeout``."""
        return self.poll(handle, job)

    def find(self, job: JobSpec) -> str | None:
        """The handle of ``job`` if it was started but the record missed it (a crash right
        after starting it) and it still runs."""
        return None

    def active(self) -> int:
        """How many watcher jobs (any watcher's) this runner's scheduler holds, queued or
        running: what ``max_active_jobs`` bounds. 0 for a runner that holds none between calls."""
        return 0

    def job_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The allow-listed part of this process's environment, plus ``extra``."""
        return {name: value for name, value in os.environ.items() if self._passes(name)} | extra

    def _passes(self, name: str) -> bool:
        if name in self.hidden_env or is_credential_name(name):
            return False
        return name in _JOB_ENV or name in self.env_pass or name.startswith(_JOB_ENV_PREFIXES)


@dataclass(frozen=True)
class _Proc:
    """The fields of /proc/<pid>/stat the local runner needs."""

    state: str
    pgrp: int
    session: int
    start: int  # clock ticks after boot: with the pid, it names one process, whatever pids are reused


def _proc(pid: int) -> _Proc | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return _Proc(state=fields[0], pgrp=int(fields[2]), session=int(fields[3]), start=int(fields[19]))


@dataclass(frozen=True)
class _LocalHandle:
    """A local job's handle, ``local:HOST:SID:START``: the host it runs on, its session id (the
    wrapper's pid, which is also its process group id) and the wrapper's start time in clock
    ticks after boot (with the pid, it names one process whatever pids are reused)."""

    host: str
    sid: int
    start: int

    def __str__(self) -> str:
        return f"local:{self.host}:{self.sid}:{self.start}"

    @classmethod
    def here(cls, pid: int, start: int) -> _LocalHandle:
        return cls(socket.gethostname(), pid, start)

    @classmethod
    def parse(cls, handle: str) -> _LocalHandle | None:
        match = re.fullmatch(r"local:(.*):(\d+):(\d+)", handle)
        return cls(match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


@dataclass
class LocalRunner(Runner):
    """Runs the job on this machine, in a session of its own so that it outlives a killed
    watcher: the next watcher follows it (see the handle) instead of starting a second copy.
    The tick waits for its job, up to the job's time limit."""

    ranks: int = 1
    python: str = field(default_factory=lambda: sys.executable)
    env_pass: frozenset[str] = frozenset()
    hidden_env: frozenset[str] = frozenset()
    kill_grace_s: float = 60.0  # between SIGTERM and SIGKILL when stopping a job at its limit
    poll_s: float = 0.5  # how often a job this runner did not start (a killed watcher's) is looked at
    waits: ClassVar[bool] = True
    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def start(self, job: JobSpec) -> str:
        command = [self.python, "-m", "mpistyle", *job.overrides]
        if self.ranks > 1:
            mpirun = shutil.which("mpirun")
            if mpirun is None:
                raise StorageError("runner.ranks > 1 needs mpirun on PATH (Debian: apt-get install openmpi-bin)")
            command = [mpirun, "-n", str(self.ranks), *command]
        env = self.job_env({"MPISTYLE_RUNS_DIR": str(job.runs_dir)})
        job.folder.mkdir(parents=True, exist_ok=True)
        job.exit_file.unlink(missing_ok=True)  # an earlier attempt's
        with job.log.open("ab") as log:
            child = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, str(job.exit_file), *command],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        self._children[child.pid] = child
        proc = _proc(child.pid)  # readable even if it has exited: it is not reaped before poll
        if proc is None:
            raise StorageError(f"the job started as process {child.pid} but /proc does not show it; is /proc mounted?")
        return str(_LocalHandle.here(child.pid, proc.start))

    def poll(self, handle: str, job: JobSpec) -> JobStatus:
        for child in list(self._children.values()):
            if child.poll() is not None:  # reap it: a zombie leader would look alive
                del self._children[child.pid]
        old = re.fullmatch(r"local:(-?\d+)", handle)  # records from before jobs had their own session
        if old:
            recorded = int(old.group(1))
            return JobStatus("done" if recorded == 0 else "failed", recorded)
        code = self._exit_code(job)
        if code is not None:
            return JobStatus("done" if code == 0 else "failed", code)
        local = _LocalHandle.parse(handle)
        if local is None:
            return JobStatus("lost", detail=f"no local job in handle {handle!r}")
        if local.host != socket.gethostname():
            return JobStatus("lost", detail=f"the job was started on {local.host}, which this host cannot follow")
        if self._members(local, job):
            return JobStatus("running", running_s=self._running_s(local.start))
        # The wrapper may have written the code and ended between the first look and the scan
        # (a busy host widens that gap): it writes before it ends, so look once more.
        code = self._exit_code(job)
        if code is not None:
            return JobStatus("done" if code == 0 else "failed", code)
        return JobStatus("lost", detail="the job stopped without recording an exit code (killed with its wrapper, or a reboot)")

    def wait(self, handle: str, job: JobSpec, submitted_at: float | None = None) -> JobStatus:
        while True:
            status = self.poll(handle, job)
            if status.state != "running":
                return status
            if status.running_s is not None and status.running_s > job.time_limit_s:
                return self._stop(handle, job)
            self._pause()

    def _pause(self) -> None:
        """One poll interval, cut short when a job this runner started ends."""
        child = next(iter(self._children.values()), None)
        if child is None:
            time.sleep(self.poll_s)
            return
        try:
            child.wait(timeout=self.poll_s)
        except subprocess.TimeoutExpired:
            pass

    def find(self, job: JobSpec) -> str | None:
        for pid in _pids():
            proc = _proc(pid)
            if proc and proc.pgrp == pid and proc.state != "Z" and _is_job(pid, job):
                return str(_LocalHandle.here(pid, proc.start))
        return None

    def active(self) -> int:
        """The watchers' local jobs on this host that have not ended: each is a session whose
        leader is the wrapper (a killed watcher's jobs run on, and count)."""
        return sum(1 for pid in _pids() if _is_wrapper(pid))

    def _exit_code(self, job: JobSpec) -> int | None:
        try:
            return int(job.exit_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _members(self, local: _LocalHandle, job: JobSpec) -> list[int]:
        """The live processes of the job's session (its session and process group ids are the
        wrapper's pid; mpirun puts each rank in a process group of its own, in the same session).
        Each must carry the job's own runs folder in its environment: a record is data anyone with
        work-area access can write, and the id in it must never make this watcher wait for, or
        kill, someone else's processes."""
        found = []
        for pid in _pids():
            proc = _proc(pid)
            if proc and proc.session == local.sid and proc.state != "Z" and proc.start >= local.start and _is_job(pid, job):
                found.append(pid)
        return found

    def _running_s(self, start: int) -> float:
        return _uptime() - start / _CLOCK_TICKS

    def _stop(self, handle: str, job: JobSpec) -> JobStatus:
        """SIGTERM to the job's process group (mpistyle, or mpirun passing it on to the ranks,
        stops at the next batch and keeps what it staged), then SIGKILL to every process of the
        job still there after the grace. (Not SIGTERM to each rank as well: a second stop signal
        ends a rank at once, its cooperative stop unfinished.)"""
        local = _LocalHandle.parse(handle)
        assert local is not None  # poll() said it runs
        if self._members(local, job):
            with suppress(ProcessLookupError):
                os.killpg(local.sid, signal.SIGTERM)
        self._wait_gone(handle, job, self.kill_grace_s)
        for pid in self._members(local, job):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_gone(handle, job, 10.0)
        code = self._exit_code(job)
        if code == 0:
            return JobStatus("done", 0)  # it finished as the limit came: nothing was cut short
        stopped = f"ran past job_time_limit_s={job.time_limit_s:g} and was stopped"
        return JobStatus("timeout", code, detail=stopped)

    def _wait_gone(self, handle: str, job: JobSpec, patience: float) -> None:
        local = _LocalHandle.parse(handle)
        assert local is not None
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and self._members(local, job):
            self.poll(handle, job)  # reaps our own child
            time.sleep(0.1)


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _is_job(pid: int, job: JobSpec) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"MPISTYLE_RUNS_DIR={job.runs_dir}".encode() in environ


def _is_wrapper(pid: int) -> bool:
    """Whether ``pid`` leads the session of a watcher's local job (its wrapper, alive)."""
    proc = _proc(pid)
    if proc is None or proc.session != pid or proc.state == "Z":
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return command[:3] == [b"/bin/sh", b"-c", _WRAPPER.encode()]


def _duration_s(text: str) -> float | None:
    """Slurm's ``[days-]hours:minutes:seconds`` (RunTime=0-01:02:03) in seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", text)
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass
class SlurmRunner(Runner):
    """Submits slurm/style.sbatch and follows the job with scontrol."""

    script: Path = DEFAULT_SBATCH_SCRIPT
    sbatch_args: Sequence[str] = ()
    env_pass: frozenset[str] = frozenset()
    hidden_env: frozenset[str] = frozenset()
    kill_grace_s: float = 60.0  # past the time limit before the watcher cancels a job Slurm left running
    retries: int = 4

    def _run(self, command: list[str], env: dict[str, str] | None = None, retry: bool = True) -> subprocess.CompletedProcess[str]:
        program = shutil.which(command[0])
        if program is None:
            raise StorageError(f"{command[0]} not found: run the watcher on a Slurm submit host, or use runner=local")
        error = ""
        for attempt in range(self.retries if retry else 1):
            if attempt:
                time.sleep(min(30.0, 1.0 * 2**attempt))  # slurmctld busy or restarting: back off
            done = subprocess.run([program, *command[1:]], capture_output=True, text=True, env=self.job_env(env or {}))
            if done.returncode == 0:
                return done
            error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            if "Invalid job id" in error:
                return done
            if "Invalid" in error or "invalid" in error:
                break  # a rejected request (partition, account, option): asking again will not help
        raise StorageError(f"{command[0]} failed ({error}); check the request and the controller (scontrol ping)")

    def start(self, job: JobSpec) -> str:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        # No requeues, neither from the script nor by Slurm (--no-requeue): a requeued job's run
        # time starts again, so --time would no longer bound the job. A job whose node fails or
        # is preempted ends (NODE_FAIL, PREEMPTED) and the watcher's own retry on a later tick,
        # which resumes from staging, takes its place without counting against the video.
        env = {"MPISTYLE_RUNS_DIR": str(job.runs_dir), "MPISTYLE_MAX_REQUEUES": "0"}
        # sbatch would export its whole environment; name the allow-listed variables instead
        # (their values come from sbatch's own environment, which is the same allow-listed one).
        exported = ",".join(sorted(self.job_env(env)))
        command = [
            "sbatch", "--parsable", f"--job-name={job.name}", f"--output={job.log}",
            f"--time={max(1, math.ceil(job.time_limit_s / 60))}", "--no-requeue", f"--export={exported}",
            *self.sbatch_args, str(self.script), *job.overrides,
        ]
        # Not retried blindly: a submission that timed out may still have created the job.
        for attempt in range(self.retries):
            try:
                done = self._run(command, env, retry=False)
                return "slurm:" + done.stdout.strip().split(";")[0]
            except StorageError:
                found = self.find(job)
                if found or attempt == self.retries - 1:
                    if found:
                        return found
                    raise
                time.sleep(min(30.0, 2.0 * 2**attempt))
        raise AssertionError("unreachable")

    def find(self, job: JobSpec) -> str | None:
        done = self._run(["squeue", "--noheader", f"--name={job.name}", "--format=%i"])
        ids = done.stdout.split()
        return f"slurm:{ids[0]}" if ids else None

    def active(self) -> int:
        """This user's watcher jobs Slurm holds, queued or running (squeue lists no ended job):
        those named as the watcher names them, mpistyle-<video key> or mpistyle-batch-<hash>."""
        done = self._run(["squeue", "--noheader", f"--user={os.getuid()}", "--format=%j"])
        return sum(1 for name in done.stdout.splitlines() if name.strip().startswith(JOB_PREFIX))

    def poll(self, handle: str, job: JobSpec) -> JobStatus:
        job_id = handle.removeprefix("slurm:")
        if not job_id.isdigit():
            return JobStatus("lost", detail=f"no Slurm job id in {handle!r}")
        done = self._run(["scontrol", "show", "job", "-o", job_id])
        if done.returncode != 0:
            return JobStatus("lost", detail=f"Slurm no longer knows job {job_id}")
        fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
        state = fields.get("JobState", "UNKNOWN")
        if state in _RUNNING:
            return JobStatus("running", detail=state, running_s=_duration_s(fields.get("RunTime", "")))
        code, _, signum = fields.get("ExitCode", "1:0").partition(":")
        exit_code = 128 + int(signum) if signum.isdigit() and int(signum) else int(code)
        if state == "COMPLETED" and exit_code == 0:
            return JobStatus("done", 0)
        if state == "TIMEOUT":
            limit = f"Slurm stopped it at its time limit (--time, job_time_limit_s={job.time_limit_s:g})"
            return JobStatus("timeout", exit_code, detail=limit)
        return JobStatus("failed", exit_code, detail=state)

    def wait(self, handle: str, job: JobSpec, submitted_at: float | None = None) -> JobStatus:
        """Returns at once: later ticks follow the job. Slurm enforces --time itself; a job it
        still shows running well past the limit (a changed limit, a wedged step) is cancelled."""
        status = self.poll(handle, job)
        if status.detail != "RUNNING":
            return status
        running_s = status.running_s
        if running_s is None and submitted_at is not None:
            running_s = time.time() - submitted_at  # no RunTime shown: count from the submission
        if running_s is not None and running_s > job.time_limit_s + self.kill_grace_s:
            self._run(["scancel", handle.removeprefix("slurm:")])
            late = f"still running after {running_s:.0f} s, past job_time_limit_s={job.time_limit_s:g}: cancelled"
            return JobStatus("timeout", detail=late)
        return status
