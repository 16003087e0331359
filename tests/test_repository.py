"""The checkout itself: what the documented commands write there stays out of git."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or not shutil.which("git"), reason="not a git checkout")
@pytest.mark.parametrize(
    "written",
    [
        "outputs/20261127-120000-42/mpistyle.log",  # every mpistyle run's directory (Hydra)
        "runs/1234/mpistyle.log",  # slurm/style.sbatch's run directories
        "runs/paint/checkpoint.pt",  # the README's training example (run_dir=runs/paint)
        "mpistyle-1234.out",  # sbatch's log of slurm/style.sbatch (--output=%x-%j.out)
        ".mpistyle-staging/abc/segment-000000000-000000024.h5",  # staging beside an output
    ],
)
def test_what_the_documented_commands_write_is_ignored_by_git(written: str) -> None:
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", written], cwd=ROOT)
    assert done.returncode == 0, f"{written} would show in git status: add it to .gitignore"
