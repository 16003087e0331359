"""slurm/style.sbatch without a cluster: its directives and rendered launch command (golden),
and every shell script of the project through bash -n and shellcheck."""
from __future__ import annotations

import os
import shutil
import subprocess
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
