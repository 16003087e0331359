"""How the watcher gets a job run: submitted to Slurm (`sbatch slurm/style.sbatch`), or run
here and now (`mpirun -n N python -m mpistyle`). External programs sit behind this small
interface; scheduler calls are retried with backoff and fail with a message saying what to do.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StorageError

# Where the sbatch script lives when running from a checkout; the config can point elsewhere.
DEFAULT_SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "style.sbatch"
# Every Slurm job state that means "not over yet" (held ones too: a person may release them).
_RUNNING = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "STAGE_OUT", "STOPPED", "SIGNALING", "SPECIAL_EXIT", "RESV_DEL_HOLD", "UPDATE_DB", "POWER_UP_NODE",
}


@dataclass(frozen=True)
class JobSpec:
    """One mpistyle run: the Hydra overrides plus where its logs go."""

    name: str
    overrides: list[str]
    log: Path  # the job's console output
    runs_dir: Path  # mpistyle puts its run directory (with mpistyle.log) in here


@dataclass(frozen=True)
class JobStatus:
    state: str  # running, done, failed, lost
    exit_code: int | None = None
    detail: str = ""


class Runner:
    hidden_env: frozenset[str] = frozenset()

    def start(self, job: JobSpec) -> str:
        """Start the job; return a handle that :meth:`poll` understands (kept in the state record)."""
        raise NotImplementedError

    def poll(self, handle: str) -> JobStatus:
        raise NotImplementedError

    def find(self, name: str) -> str | None:
        """The handle of a job started under ``name`` that the record missed (a crash right
        after starting it), if the scheduler still knows it."""
        return None

    def job_env(self, extra: dict[str, str]) -> dict[str, str]:
        """This process's environment without the storage secrets, plus ``extra``."""
        return {k: v for k, v in os.environ.items() if k not in self.hidden_env} | extra


@dataclass
class LocalRunner(Runner):
    """Runs the job to the end inside the watcher's tick, on this machine."""

    ranks: int = 1
    python: str = field(default_factory=lambda: sys.executable)
    hidden_env: frozenset[str] = frozenset()

    def start(self, job: JobSpec) -> str:
        command = [self.python, "-m", "mpistyle", *job.overrides]
        if self.ranks > 1:
            mpirun = shutil.which("mpirun")
            if mpirun is None:
                raise StorageError("runner.ranks > 1 needs mpirun on PATH (Debian: apt-get install openmpi-bin)")
            command = [mpirun, "-n", str(self.ranks), *command]
        env = self.job_env({"MPISTYLE_RUNS_DIR": str(job.runs_dir)})
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with job.log.open("ab") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        return f"local:{done.returncode}"

    def poll(self, handle: str) -> JobStatus:
        code = handle.removeprefix("local:")
        if not code.lstrip("-").isdigit():
            return JobStatus("lost", detail="the watcher stopped while the job ran here")
        exit_code = int(code)
        return JobStatus("done" if exit_code == 0 else "failed", exit_code)


@dataclass
class SlurmRunner(Runner):
    """Submits slurm/style.sbatch and follows the job with scontrol."""

    script: Path = DEFAULT_SBATCH_SCRIPT
    sbatch_args: Sequence[str] = ()
    hidden_env: frozenset[str] = frozenset()
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
        command = [
            "sbatch", "--parsable", f"--job-name={job.name}", f"--output={job.log}",
            *self.sbatch_args, str(self.script), *job.overrides,
        ]
        env = {"MPISTYLE_RUNS_DIR": str(job.runs_dir)}
        # Not retried blindly: a submission that timed out may still have created the job.
        for attempt in range(self.retries):
            try:
                done = self._run(command, env, retry=False)
                return "slurm:" + done.stdout.strip().split(";")[0]
            except StorageError:
                found = self.find(job.name)
                if found or attempt == self.retries - 1:
                    if found:
                        return found
                    raise
                time.sleep(min(30.0, 2.0 * 2**attempt))
        raise AssertionError("unreachable")

    def find(self, name: str) -> str | None:
        done = self._run(["squeue", "--noheader", f"--name={name}", "--format=%i"])
        ids = done.stdout.split()
        return f"slurm:{ids[0]}" if ids else None

    def poll(self, handle: str) -> JobStatus:
        job_id = handle.removeprefix("slurm:")
        if not job_id.isdigit():
            return JobStatus("lost", detail=f"no Slurm job id in {handle!r}")
        done = self._run(["scontrol", "show", "job", "-o", job_id])
        if done.returncode != 0:
            return JobStatus("lost", detail=f"Slurm no longer knows job {job_id}")
        fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
        state = fields.get("JobState", "UNKNOWN")
        if state in _RUNNING:
            return JobStatus("running", detail=state)
        exit_code = int(fields.get("ExitCode", "1:0").split(":")[0])
        if state == "COMPLETED" and exit_code == 0:
            return JobStatus("done", 0)
        return JobStatus("failed", exit_code or 1, detail=state)
