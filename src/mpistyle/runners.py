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
_RUNNING = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "STAGE_OUT",
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
    def start(self, job: JobSpec) -> str:
        """Start the job; return a handle that :meth:`poll` understands (kept in the state record)."""
        raise NotImplementedError

    def poll(self, handle: str) -> JobStatus:
        raise NotImplementedError


@dataclass
class LocalRunner(Runner):
    """Runs the job to the end inside the watcher's tick, on this machine."""

    ranks: int = 1
    python: str = field(default_factory=lambda: sys.executable)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, job: JobSpec) -> str:
        command = [self.python, "-m", "mpistyle", *job.overrides]
        if self.ranks > 1:
            mpirun = shutil.which("mpirun")
            if mpirun is None:
                raise StorageError("runner.ranks > 1 needs mpirun on PATH (Debian: apt-get install openmpi-bin)")
            command = [mpirun, "-n", str(self.ranks), *command]
        env = {**os.environ, "MPISTYLE_RUNS_DIR": str(job.runs_dir), **self.env}
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
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 4

    def _run(self, command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        program = shutil.which(command[0])
        if program is None:
            raise StorageError(f"{command[0]} not found: run the watcher on a Slurm submit host, or use runner=local")
        error = ""
        for attempt in range(self.retries):
            done = subprocess.run(
                [program, *command[1:]], capture_output=True, text=True, env={**os.environ, **self.env, **(env or {})}
            )
            if done.returncode == 0:
                return done
            error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            if "Invalid job id" in error:
                return done
            time.sleep(min(30.0, 1.0 * 2**attempt))  # slurmctld busy or restarting: back off
        raise StorageError(f"{command[0]} kept failing ({error}); check the Slurm controller (scontrol ping)")

    def start(self, job: JobSpec) -> str:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            "sbatch", "--parsable", f"--job-name={job.name[:60]}", f"--output={job.log}",
            *self.sbatch_args, str(self.script), *job.overrides,
        ]
        done = self._run(command, {"MPISTYLE_RUNS_DIR": str(job.runs_dir)})
        return "slurm:" + done.stdout.strip().split(";")[0]

    def poll(self, handle: str) -> JobStatus:
        job_id = handle.removeprefix("slurm:")
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
