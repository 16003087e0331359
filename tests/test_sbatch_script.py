"""slurm/style.sbatch without a cluster: its directives and rendered launch command (golden),
and every shell script of the project through bash -n and shellcheck."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TESTS

ROOT = TESTS.parent
SCRIPT = ROOT / "slurm" / "style.sbatch"
GOLDEN = TESTS / "golden" / "style.sbatch.txt"
SHELL_SCRIPTS = sorted(
    [
        *ROOT.glob("scripts/*.sh"), *ROOT.glob("slurm/*.sbatch"), *ROOT.glob("cyclecloud/**/*.sh"),
        *ROOT.glob("deploy/**/*.sh"), ROOT / ".ci" / "run",
    ]
)

CASES = {
    "srun, GPU node": {"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "6"},
    "srun, shared staging": {"MPISTYLE_STAGING": "/shared/staging", "SLURM_NTASKS": "2"},
    "mpirun": {"MPISTYLE_LAUNCHER": "mpirun", "SLURM_NTASKS": "2"},
}


def render() -> str:
    lines = ["# #SBATCH directives"]
    lines += [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    for name, extra in CASES.items():
        env = {
            "PATH": os.environ["PATH"],
            "MPISTYLE_PYTHON": "/opt/mpistyle/bin/python",
            "MPISTYLE_DRY_RUN": "1",
            "SLURM_SUBMIT_DIR": "/home/user",
            **extra,
        }
        done = subprocess.run(
            ["bash", str(SCRIPT), "input=/shared/in video.mp4", "output=/shared/out.mp4", "model.style=5"],
            env=env, capture_output=True, text=True, check=True,
        )
        lines += [f"# {name}", done.stdout.strip(), *(f"# stderr: {line}" for line in done.stderr.splitlines())]
    return "\n".join(lines) + "\n"


def test_rendered_options_match_the_golden_file() -> None:
    rendered = render()
    if os.environ.get("MPISTYLE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "rendered sbatch changed: review, then MPISTYLE_UPDATE_GOLDEN=1 to accept"


def test_unknown_launcher_is_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "MPISTYLE_LAUNCHER": "ssh"}, capture_output=True, text=True)
    assert done.returncode == 2 and "MPISTYLE_LAUNCHER must be srun or mpirun" in done.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("MPISTYLE_REQUIRE_SERVICES") == "1":
            pytest.fail("shellcheck not installed (scripts/setup.sh --test installs it)")
        pytest.skip("shellcheck not installed (scripts/setup.sh --test installs it)")
    checked = subprocess.run([shellcheck, "-x", "-s", "bash", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_a_job_restarted_past_the_cap_gives_up() -> None:
    env = {**os.environ, "MPISTYLE_DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "4", "MPISTYLE_MAX_REQUEUES": "3"}
    done = subprocess.run(["bash", str(SCRIPT), "input=x.mp4", "output=y.mp4"], env=env, capture_output=True, text=True)
    assert done.returncode == 9 and "restarted 4 times, more than MPISTYLE_MAX_REQUEUES=3" in done.stderr
    within = subprocess.run(["bash", str(SCRIPT), "input=x.mp4"], env={**env, "SLURM_RESTART_COUNT": "3"}, capture_output=True)
    assert within.returncode == 0


@pytest.mark.parametrize(("restarts", "requeued"), [("2", True), ("3", False)])
def test_the_time_limit_warning_requeues_only_below_the_cap(tmp_path: Path, restarts: str, requeued: bool) -> None:
    """The script as Slurm runs it, with stand-ins for srun (a step that stops on SIGUSR1, as the
    ranks do) and scontrol (which records its calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntrap 'exit 138' USR1\ntouch {tmp_path}/started\nwhile :; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": restarts,
           "MPISTYLE_MAX_REQUEUES": "3"}
    job = subprocess.Popen(["bash", str(SCRIPT), "input=x.mp4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends 180 s before the time limit
    if not requeued:
        time.sleep(0.5)
        assert job.poll() is None  # the ranks run on
        job.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit
    _, stderr = job.communicate(timeout=10)
    calls = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
    assert job.returncode == 138
    if requeued:
        assert calls == "requeue 42\n" and "requeueing job 42" in stderr
    else:
        assert calls == "" and "not requeueing it again" in stderr and "MPISTYLE_MAX_REQUEUES=3" in stderr
