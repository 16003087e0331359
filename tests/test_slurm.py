"""`sbatch slurm/style.sbatch` end to end on a real single-node Slurm started by the tests."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster

from conftest import MPI_ENV, TESTS
from media import audio_packets, decode_all

SCRIPT = TESTS.parent / "slurm" / "style.sbatch"
pytestmark = pytest.mark.slurm


def job_env(tmp_path: Path) -> dict[str, str]:
    return {
        **MPI_ENV,
        "MPISTYLE_PYTHON": sys.executable,
        "MPISTYLE_STAGING": str(tmp_path / "staging"),
        "PYTHONPATH": str(TESTS),
    }


def test_job_restyles_a_video_on_two_ranks(slurm: SlurmCluster, video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=24, gop=4)
    output = tmp_path / "results" / "out.mp4"
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"input={source}", f"output={output}", "model.style=3",
                       cwd=tmp_path, env=job_env(tmp_path))
    info = slurm.wait(job)
    log = (tmp_path / f"mpistyle-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0"
    assert len(decode_all(output)[0]) == 24
    assert audio_packets(output) == audio_packets(source)
    report = json.loads(Path(f"{output}.report.json").read_text())
    assert report["ranks"] == 2 and report["run_id"] == str(job)
    assert report["model"]["style"] == 3
    # Run directory keyed by the job id; the staging area was emptied after success.
    assert "wrote " in (tmp_path / "runs" / str(job) / "mpistyle.log").read_text()
    assert not list((tmp_path / "staging").glob("*/*.h5"))
    assert "2 rank(s)" in log


def test_a_batch_job_delivers_each_video_and_a_bad_one_fails_alone(
    slurm: SlurmCluster, video: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    good = [video(f"in/{name}", frames=frames, gop=4, start=index * 100)
            for index, (name, frames) in enumerate((("a.mp4", 24), ("b.mkv", 16)))]
    (tmp_path / "in" / "bad.mp4").write_bytes(b"not a video" * 50)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in (
        {"input": str(good[0]), "output": str(tmp_path / "out" / "a.mp4"), "model.style": 3},
        {"input": str(tmp_path / "in" / "bad.mp4"), "output": str(tmp_path / "out" / "bad.mp4")},
        {"input": str(good[1]), "output": str(tmp_path / "out" / "b.mp4")},
    )))
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"inputs={jobs}", "report.preview_frames=0",
                       cwd=tmp_path, env=job_env(tmp_path))
    info = slurm.wait(job)
    log = (tmp_path / f"mpistyle-{job}.out").read_text()
    assert info["ExitCode"] == "8:0", log  # finished, some videos failed
    assert "1 of 3 videos failed" in log and "Traceback" not in log
    for source, name in zip(good, ("a", "b"), strict=True):
        assert len(decode_all(tmp_path / "out" / f"{name}.mp4")[0]) == len(decode_all(source)[0])
        assert json.loads((tmp_path / "out" / f"{name}.mp4.report.json").read_text())["ranks"] == 2
    assert json.loads((tmp_path / "out" / "a.mp4.report.json").read_text())["model"]["style"] == 3
    assert json.loads((tmp_path / "out" / "bad.mp4.error.json").read_text())["exit_code"] == 3
    report = json.loads((tmp_path / "batch-report.json").read_text())
    assert [v["status"] for v in report["per_video"]] == ["done", "failed", "done"]


def test_bad_input_fails_with_the_clear_error_in_the_log(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"input={tmp_path / 'missing.mp4'}",
                       f"output={tmp_path / 'out.mp4'}", cwd=tmp_path, env=job_env(tmp_path))
    info = slurm.wait(job)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"] == "3:0"
    log = (tmp_path / f"mpistyle-{job}.out").read_text()
    assert f"error: input not found: {tmp_path / 'missing.mp4'}" in log
    assert "Traceback" not in log


def _wait_for_staged_gops(tmp_path: Path, slurm: SlurmCluster, job: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((tmp_path / "staging").glob("*/segment-*.h5")):
        assert time.monotonic() < deadline, f"no GOP staged; job {slurm.job(job).get('JobState')}"
        time.sleep(0.1)


def test_scancel_leaves_no_half_written_output(slurm: SlurmCluster, video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=80, width=320, height=180, gop=4)
    output = tmp_path / "out.mp4"
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"input={source}", f"output={output}",
                       cwd=tmp_path, env=job_env(tmp_path))
    _wait_for_staged_gops(tmp_path, slurm, job)
    slurm.run("scancel", str(job))
    info = slurm.wait(job)
    assert info["JobState"] == "CANCELLED"
    # Ranks finish their batch and exit after the job is marked cancelled (within KillWait).
    deadline = time.monotonic() + 40
    while _job_processes(job):
        assert time.monotonic() < deadline, "ranks outlived KillWait"
        time.sleep(0.2)
    assert not output.exists()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def _job_processes(job: int) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"SLURM_JOB_ID={job}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(proc.name)
        except OSError:
            continue
    return found


def test_time_limit_warning_requeues_and_the_job_resumes(
    slurm: SlurmCluster, video: Callable[..., Path], tmp_path: Path
) -> None:
    source = video(frames=80, width=320, height=180, gop=4)
    output = tmp_path / "out.mp4"
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"input={source}", f"output={output}",
                       cwd=tmp_path, env=job_env(tmp_path))
    _wait_for_staged_gops(tmp_path, slurm, job)
    # What Slurm does 180 s before the time limit (--signal=B:USR1@180), sent now.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm.wait(job, timeout=300)
    log = (tmp_path / f"mpistyle-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1"
    assert "requeueing job" in log and "stopped by SIGUSR1" in log
    report = json.loads(Path(f"{output}.report.json").read_text())
    assert 0 < report["frames_reused"] < 80
    assert len(decode_all(output)[0]) == 80


def test_the_plain_command_runs_on_nodes_with_few_cpus(slurm: SlurmCluster, video: Callable[..., Path], tmp_path: Path) -> None:
    # No sbatch flags at all, as the README's first Slurm line: the script asks for no more CPUs
    # than Slurm's default (a default of 4 left this job pending for ever on these 2-CPU nodes).
    assert int(slurm.run("sinfo", "-h", "-o", "%c").stdout.strip()) < 4
    source = video(frames=8)
    output = tmp_path / "out.mp4"
    job = slurm.sbatch(str(SCRIPT), f"input={source}", f"output={output}", cwd=tmp_path, env=job_env(tmp_path))
    info = slurm.wait(job, timeout=120)
    log = (tmp_path / f"mpistyle-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert len(decode_all(output)[0]) == 8
    assert "each rank has 1 CPU (no --cpus-per-task)" in log and "add --cpus-per-task=N" in log
