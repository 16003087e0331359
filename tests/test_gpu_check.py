"""bench/gpu.sh, the one command for a GPU machine, dry-run here (every step but the CUDA ones,
on the CPU at 160x90), so it cannot rot between the rare runs on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import MPI_ENV

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_dry_runs_every_step(tmp_path: Path) -> None:
    env = {**os.environ, **MPI_ENV, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [str(REPO / "bench" / "gpu.sh"), "--dry-run", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    figures = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert figures["dry_run"] is True and figures["errors"] == {}
    assert "skipped" in figures["tests"]["summary"]  # the GPU tests ran, and skipped without CUDA
    assert figures["machine"]["cuda_available"] is False
    assert {run["precision"] for run in figures["model"]["runs"]} == {"fp32", "bf16", "fp16"}
    assert figures["model_compiled"]["runs"][0]["kernels"] in ("aot", "jit")
    assert figures["decode"]["runs"][0]["frames"] == figures["clip"]["frames"]
    assert figures["encode"]["runs"][0]["encoder"] == "libx264"
    assert figures["encode"]["runs"][0]["role"] == "default"
    assert figures["profile"]["operators"] and figures["profile"]["frames_per_s"] > 0
    variants = figures["variants"]["runs"]
    assert variants[0]["psnr_db"] is None and all(run["frames_per_s"] > 0 for run in variants)
    assert figures["user_clips"]["clips"]["clip-1gop.mp4"]["keyframes"] == 1
    assert figures["user_clips"]["clips"]["clip-open-gop.ts"]["codec"] == "mpeg2video"
    for kind in ("1gop", "open_gop_ts"):  # the default command beside the loop a user would write
        pair = figures[f"vs_reference_{kind}"]
        assert pair["default_command"]["frames"] == pair["reference"]["frames"] == 60
        assert figures["goals"][f"default_vs_reference_{kind}"] == pair["default_vs_reference"] > 0
    for step, ranks in (("e2e_1", 1), ("e2e_2", 2), ("e2e_compiled", 1)):
        assert figures[step]["ranks"] == ranks
        assert [rank["device"] for rank in figures[step]["per_rank"]] == ["cpu"] * ranks
    assert figures["goals"]["end_to_end_frames_per_s"] > 0
