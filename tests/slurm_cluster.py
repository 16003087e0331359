"""A real single-node Slurm (Debian's slurm-wlm + munge) for the tests, on loopback.

Writes a slurm.conf for this machine (no cgroups, no systemd, no accounting database), starts
munged (unless one already answers), slurmctld and slurmd, and stops what it started.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    pass


# munged, when one of this process's clusters started it: the clusters sharing it (the suite's
# single node and the multi-node one may both run); the last one to stop stops it.
_MUNGE = {"started": 0, "users": 0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _program(name: str) -> str:
    for folder in (None, "/usr/sbin", "/sbin"):
        found = shutil.which(name, path=folder)
        if found:
            return found
    raise SlurmUnavailable(f"{name} not found: install slurm-wlm and munge (scripts/setup.sh --test)")


def _memory_mb() -> int:
    """This machine's memory less 1 GiB for the system, as slurmd reports it."""
    return int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 - 1024


class SlurmCluster:
    controller_address = "127.0.0.1"  # where slurmctld listens for the nodes

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self._started: list[subprocess.Popen[bytes]] = []
        self.programs: dict[str, str] = {}
        self._munge_user = False  # counted among munged's users (_MUNGE)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        self.programs = {name: _program(name) for name in DAEMONS}
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge(self.programs["munged"])
        self.conf.write_text("\n".join([*self.settings(), *self.layout(), ""]))
        log = (self.root / "log" / "daemons.out").open("ab")
        for command in self.daemons():
            daemon = subprocess.Popen([*command, "-f", str(self.conf)], env=self.env(), stdout=log, stderr=log)
            self._started.append(daemon)
        self.start_nodes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for daemon in self._started:
                if daemon.poll() is not None:
                    raise SlurmUnavailable(f"{daemon.args[0]} exited: {self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"the nodes did not become idle in {timeout:.0f} s: {self._log_tail()}")

    def settings(self) -> list[str]:
        """slurm.conf lines of the controller and the policies, for every layout."""
        return [
            "ClusterName=mpistyle-test",
            f"SlurmctldHost={socket.gethostname()}({self.controller_address})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            # A requeued job waits this long before it may start again (default 120 s).
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            # No cgroups or systemd on these machines.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # A requeued job may start once cred_expire has passed, but only a scheduling pass
            # starts it: the backfill one runs only after some change, the main one every
            # sched_interval (60 s by default); here every 2 s.
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "KillWait=30",
            "MinJobAge=600",
        ]

    def layout(self) -> list[str]:
        """The nodes and partitions: here one node, this machine, on loopback."""
        cpus = os.cpu_count() or 1
        host = socket.gethostname()
        return [
            f"NodeName=localhost NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]

    def daemons(self) -> list[list[str]]:
        return [[self.programs["slurmctld"], "-D"], [self.programs["slurmd"], "-D", "-N", "localhost"]]

    def start_nodes(self) -> None:
        """Start compute nodes that are not among daemons() (none here: slurmd is one of them)."""

    def ready(self) -> bool:
        return self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle"

    def _start_munge(self, munged: str) -> None:
        _MUNGE["users"] += 1
        self._munge_user = True
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is already running and answering (this process's or the system's)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", munged], check=True, capture_output=True)
        _MUNGE["started"] = 1
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmUnavailable("munged started but does not answer")

    def stop(self) -> None:
        for daemon in self._started:
            daemon.terminate()
        for daemon in self._started:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if self._munge_user:
            _MUNGE["users"] -= 1
            self._munge_user = False
        if _MUNGE["started"] and not _MUNGE["users"]:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
            _MUNGE["started"] = 0

    def _log_tail(self) -> str:
        lines = []
        for path in sorted((self.root / "log").glob("*")):
            lines += path.read_text(errors="replace").splitlines()[-5:]
        return " | ".join(lines)

    # -- use ---------------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(
        self, *command: str, check: bool = True, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command), capture_output=True, text=True, check=check, env=env or self.env(), cwd=cwd, timeout=60
        )

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        done = self.run("sbatch", "--parsable", *args, cwd=cwd, env=self.env(env), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        shown = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", shown))

    def wait(self, job_id: int, states: set[str] = FINAL_STATES, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")
