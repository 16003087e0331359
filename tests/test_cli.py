"""The real `mpistyle` program, as a user runs it: one process, or under mpirun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.watch.status import STUCK_EXIT

from conftest import MPI_ENV, TESTS, mpistyle_command, run_mpistyle
from media import audio_packets, decode_all


def test_help_and_cfg_job(tmp_path: Path) -> None:
    shown = run_mpistyle("--help", cwd=tmp_path)
    assert shown.returncode == 0
    assert "mpistyle input=in.mp4 output=out.mp4" in shown.stdout
    assert "multistyle" in next(line for line in shown.stdout.splitlines() if line.startswith("model: "))
    job = run_mpistyle("--cfg", "job", "model.style=5", "input=a.mp4", cwd=tmp_path)
    assert job.returncode == 0
    assert "style: 5" in job.stdout and "input: a.mp4" in job.stdout


def test_help_lists_the_job_config_groups_and_only_those(tmp_path: Path) -> None:
    # Hydra's own list ($APP_CONFIG_GROUPS) showed the watcher's groups and the schemas too.
    shown = run_mpistyle("--help", cwd=tmp_path).stdout
    block = shown.split("== Choices (group=option) ==")[1].split("==")[0]
    listed = dict(line.split(": ") for line in block.strip().splitlines())
    configs = TESTS.parent / "configs"
    groups = ("model", "report", "staging", "video")  # what configs/config.yaml's defaults choose from
    assert listed == {group: ", ".join(sorted(p.stem for p in (configs / group).glob("*.yaml"))) for group in groups}


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _subclasses(child)]


def test_exit_codes_are_one_table_in_the_readme_the_help_and_the_code(tmp_path: Path) -> None:
    readme = (TESTS.parent / "README.md").read_text()
    table = readme[readme.index("## Exit codes") :].split("\n\n")[1]
    documented = {row.split("|")[1].strip() for row in table.splitlines()[2:]}
    raised = {str(cls.exit_code) for cls in _subclasses(MpistyleError) if isinstance(cls.__dict__.get("exit_code"), int)}
    stuck = str(STUCK_EXIT)  # mpistyle-watch status's verdict, not an error
    assert raised | {"0", "128+N", stuck} == documented  # every code the programs can exit with, and no other
    footer = run_mpistyle("--help", cwd=tmp_path).stdout.split("Exit codes:")[1]
    for code in documented - {"9", stuck}:  # mpistyle-watch's alone
        assert f" {code} " in footer.replace(",", " ").replace("\n", " "), f"--help does not explain exit code {code}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("mpistyle")
    assert script.exists(), "pip install -e . should install the mpistyle console script"
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "== Choices" in shown.stdout


def test_one_process_run_dir_and_logs(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=12)
    done = run_mpistyle(f"input={source}", f"output={tmp_path / 'out.mp4'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "mpistyle.log").read_text().count("wrote ") == 1
    assert (runs[0] / ".hydra" / "config.yaml").exists()
    assert "progress: 12/12 frames" in done.stderr


@pytest.mark.parametrize(
    "overrides, code, words",
    [
        (["input=/nonexistent/in.mp4"], 3, "input not found"),
        (["model.style=99"], 2, "unknown style 99"),
        (["batch_size=-4"], 2, "batch_size must be at least 1"),
        (["model=transformer_net", "model.checkpoint={bad}"], 5, "cannot read checkpoint"),
        (["input={noise}"], 3, "not a video"),
    ],
)
def test_errors_are_one_line_with_exit_code(
    video: Callable[..., Path], tmp_path: Path, overrides: list[str], code: int, words: str
) -> None:
    source = video(frames=6)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(bytes(range(256)) * 40)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    args = [f"input={source}", f"output={tmp_path / 'out.mp4'}"]
    args += [o.format(bad=bad, noise=noise) for o in overrides]
    done = run_mpistyle(*args, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and words in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()
    # Refused before any work: no run directory is left behind for it.
    assert not list((tmp_path / "outputs").glob("*"))


def test_a_refused_run_leaves_a_folder_of_the_user_s_own_as_it_was(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    done = run_mpistyle(
        f"input={tmp_path / 'gone.mp4'}", f"output={tmp_path / 'out.mp4'}", f"hydra.run.dir={mine}", cwd=tmp_path
    )
    assert done.returncode == 3, done.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_requeued_job_keeps_its_run_directory_when_refused(video: Callable[..., Path], tmp_path: Path) -> None:
    # Under Slurm the run directory is the job id's: a requeued attempt finds the earlier one's log.
    earlier = tmp_path / "outputs" / "4242"
    earlier.mkdir(parents=True)
    (earlier / "mpistyle.log").write_text("the earlier attempt's log\n")
    done = run_mpistyle(
        f"input={tmp_path / 'gone.mp4'}", f"output={tmp_path / 'out.mp4'}", cwd=tmp_path, env={"SLURM_JOB_ID": "4242"}
    )
    assert done.returncode == 3, done.stderr
    log = (earlier / "mpistyle.log").read_text()
    assert log.startswith("the earlier attempt's log") and "input not found" in log


@pytest.mark.mpi
def test_output_is_the_same_file_for_one_two_and_three_ranks(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=31, width=80, height=60, gop=5)  # 7 GOPs: no even split for 2 or 3
    outputs, output_bytes = {}, {}
    for ranks in (1, 2, 3):
        output = tmp_path / f"out{ranks}.mp4"
        # Segments of 2 GOPs (10, 10, 10, 1 frames), each a temporal blend chain of its own.
        done = run_mpistyle(
            f"input={source}", f"output={output}", "model.style=5", "video.segment_seconds=0.8", "temporal.alpha=0.5",
            ranks=ranks, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(Path(f"{output}.report.json").read_text())
        assert report["ranks"] == ranks and len(report["per_rank"]) == ranks
        assert sum(r["frames"] for r in report["per_rank"]) == 31
        # Every rank logs its share; only rank 0 writes the job's files.
        for rank in range(ranks):
            assert f"rank {rank}/{ranks} on " in done.stderr
        outputs[ranks] = decode_all(output)
        output_bytes[ranks] = output.read_bytes()
        assert report["output"]["segments"] == 4
        assert audio_packets(output) == audio_packets(source)
    frames1, times1 = outputs[1]
    assert len(frames1) == 31
    for ranks in (2, 3):
        frames, times = outputs[ranks]
        assert times == times1
        assert all(np.array_equal(a, b) for a, b in zip(frames, frames1))
        assert output_bytes[ranks] == output_bytes[1]  # the same file, bit for bit
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 3  # one run directory per job, not per rank
    for run_dir in runs:
        # Only rank 0 writes there: one log, one Hydra config dump.
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "mpistyle.log"]
    # Decoding and encoding in threads beside the model (the GPU default) changes nothing either.
    threaded = tmp_path / "threaded.mp4"
    done = run_mpistyle(
        f"input={source}", f"output={threaded}", "model.style=5", "video.segment_seconds=0.8", "temporal.alpha=0.5",
        "overlap=true", ranks=2, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert all(r["overlap"] for r in json.loads(Path(f"{threaded}.report.json").read_text())["per_rank"])
    assert threaded.read_bytes() == output_bytes[1]


@pytest.mark.mpi
def test_compiled_bf16_output_is_the_same_file_for_any_rank_count_at_the_same_threads_per_rank(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    # Compiled kernels round with the thread count; at one thread per rank the file is the same.
    source = video(frames=20, width=64, height=48, gop=5)
    files = set()
    for ranks in (1, 2, 3):
        output = tmp_path / f"out{ranks}.mp4"
        done = run_mpistyle(
            f"input={source}", f"output={output}", "compile=true", "precision=bf16", "threads=1",
            "video.segment_seconds=0", "report.preview_frames=0", ranks=ranks, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        per_rank = json.loads(Path(f"{output}.report.json").read_text())["per_rank"]
        assert [(r["precision"], r["compiled"], r["threads"]) for r in per_rank] == [("bf16", True, 1)] * ranks
        files.add(output.read_bytes())
    assert len(files) == 1


def test_compiled_kernels_are_reused_from_the_cache_and_a_failing_compile_scores_eagerly(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    source = video(frames=4, width=48, height=32)
    cache = tmp_path / "kernels"
    logs, reused = [], []
    for attempt in ("cold", "warm"):
        done = run_mpistyle(
            f"input={source}", f"output={tmp_path / attempt}.mp4", "compile=true", f"compile_cache={cache}",
            "staging.keep=true", cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        logs.append(next(line for line in done.stderr.splitlines() if "rank 0/1 on" in line))
        reused.append(json.loads((tmp_path / f"{attempt}.mp4.report.json").read_text())["frames_reused"])
    assert "compiled ahead of time, built in" in logs[0] and f"new, kept in the compile cache {cache}" in logs[0]
    assert "compiled ahead of time, loaded in" in logs[1] and f"from the compile cache {cache}" in logs[1]
    # A cache that cannot be made (a file in the way) fails the compile: the job goes on eagerly.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    done = run_mpistyle(
        f"input={source}", f"output={tmp_path / 'eager.mp4'}", "compile=true", f"compile_cache={blocked}",
        "staging.keep=true", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "torch.compile failed" in done.stderr and "scoring eagerly instead" in done.stderr
    report = json.loads((tmp_path / "eager.mp4.report.json").read_text())
    assert report["per_rank"][0]["compiled"] is False
    # A resumed job reuses only what its own kind of kernels scored (they round differently):
    # the warm job took the cold one's frames, the eager one none of them.
    assert [*reused, report["frames_reused"]] == [0, 4, 0]
    # The job done at last (staging not kept) removes what every kind of kernels staged for it.
    assert len(list((tmp_path / ".mpistyle-staging").iterdir())) == 2
    done = run_mpistyle(
        f"input={source}", f"output={tmp_path / 'last.mp4'}", "compile=true", f"compile_cache={cache}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".mpistyle-staging").exists()


@pytest.mark.mpi
def test_a_slow_rank_takes_fewer_segments_and_the_file_is_the_same(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=24, gop=2, audio=0)  # 12 segments of one GOP each
    common = [f"input={source}", "video.segment_seconds=0", "report.preview_frames=0", "~model"]
    alone = run_mpistyle(*common, f"output={tmp_path / 'alone.mp4'}", "+model._target_=frame_models.invert", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    output = tmp_path / "out.mp4"
    done = run_mpistyle(
        *common, f"output={output}", "+model._target_=frame_models.slow_on_rank", "+model.rank=1", "+model.seconds=0.25",
        ranks=2, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    per_rank = json.loads(Path(f"{output}.report.json").read_text())["per_rank"]
    taken = [rank["segments"] for rank in per_rank]
    assert sorted(number for numbers in taken for number in numbers) == list(range(12))  # each once
    assert len(taken[1]) < len(taken[0])  # handed out on demand: the fast rank did more
    assert output.read_bytes() == (tmp_path / "alone.mp4").read_bytes()  # whoever did which


@pytest.mark.mpi
def test_a_rank_failing_mid_job_stops_every_rank(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=24, gop=4)
    output = tmp_path / "out.mp4"
    done = run_mpistyle(
        f"input={source}", f"output={output}", "~model", "+model._target_=frame_models.fail_on_rank",
        "+model.rank=1", "batch_size=2", ranks=2, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "rank 1: internal error: RuntimeError: simulated failure inside the model" in errors[0]
    assert "mpistyle.log" in errors[0]  # where the traceback went
    assert not output.exists()
    assert not list(tmp_path.glob(".out*partial*"))


@pytest.mark.mpi
def test_the_root_failing_stops_the_other_ranks_early(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=48, gop=4)
    done = run_mpistyle(
        f"input={source}", f"output={tmp_path / 'out.mp4'}", "~model", "+model._target_=frame_models.fail_on_rank",
        "+model.rank=0", ranks=2, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "internal error: RuntimeError: simulated failure inside the model" in errors[0]
    # Rank 1 was told to stop: it never reports its share as scored.
    assert "[rank 1/2] INFO scored" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.mpi
def test_a_rank_failing_to_load_the_model(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=12)
    done = run_mpistyle(
        f"input={source}", f"output={tmp_path / 'out.mp4'}", "~model", "+model._target_=frame_models.refuse_on_rank",
        "+model.rank=2", ranks=3, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 5, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert errors == [errors[0]] and "rank 2: simulated damaged checkpoint" in errors[0]


def test_sigterm_stops_cleanly_and_the_rerun_resumes(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=60, width=320, height=180, gop=4)
    output = tmp_path / "out.mp4"
    staging = tmp_path / "staging"
    # A segment per GOP: stops and resumes at the finest grain.
    args = [f"input={source}", f"output={output}", f"staging.root={staging}", "video.segment_seconds=0"]
    env = {**os.environ, **MPI_ENV}
    job = subprocess.Popen(mpistyle_command(*args), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(staging.glob("*/segment-*.h5")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not output.exists() and not list(tmp_path.glob(".out*partial*"))
    assert not list(staging.glob("*/*partial*"))
    staged = len(list(staging.glob("*/segment-*.h5")))
    assert 1 <= staged < 15

    done = run_mpistyle(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(f"{output}.report.json").read_text())
    assert report["frames_reused"] == 4 * staged
    assert len(decode_all(output)[0]) == 60


def _rank_pids(parent: int, rank: int) -> list[int]:
    """PIDs of the processes mpirun started for ``rank`` (read from their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and b"MPISTYLE_TEST_MARK=" + str(parent).encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.mpi
def test_a_killed_rank_ends_the_job_promptly_and_the_rerun_resumes(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=60, width=320, height=180, gop=4)
    staging = tmp_path / "staging"
    reference = tmp_path / "reference.mp4"
    done = run_mpistyle(
        f"input={source}", f"output={reference}", f"staging.root={tmp_path / 'ref-staging'}", "video.segment_seconds=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr

    output = tmp_path / "out.mp4"
    # A segment per GOP: stops and resumes at the finest grain.
    args = [f"input={source}", f"output={output}", f"staging.root={staging}", "video.segment_seconds=0"]
    env = {**os.environ, **MPI_ENV, "MPISTYLE_TEST_MARK": str(os.getpid())}
    job = subprocess.Popen(mpistyle_command(*args, ranks=2), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(staging.glob("*/segment-*.h5"))) < 2:
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    victims = _rank_pids(os.getpid(), 1)
    assert victims
    killed_at = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert time.monotonic() - killed_at < 15, "the other rank kept the job alive"
    assert job.returncode != 0
    assert "rank 1" in stderr and "signal 9" in stderr  # mpirun names the rank and the cause
    assert not output.exists() and not list(tmp_path.glob(".out*partial*"))

    done = run_mpistyle(*args, ranks=2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(f"{output}.report.json").read_text())
    assert report["frames_reused"] >= 8
    resumed, reference_frames = decode_all(output)[0], decode_all(reference)[0]
    assert len(resumed) == 60 and all(np.array_equal(a, b) for a, b in zip(resumed, reference_frames, strict=True))


def test_a_run_directory_that_cannot_be_made_is_one_line_and_exit_4(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=4)
    (tmp_path / "plain-file").write_text("")
    # Hydra makes the run directory itself and failed with a traceback and exit 1.
    done = run_mpistyle(f"input={source}", f"output={tmp_path / 'out.mp4'}",
                        f"hydra.run.dir={tmp_path / 'plain-file' / 'run'}", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: cannot create the run directory {tmp_path / 'plain-file' / 'run'}: {tmp_path / 'plain-file'} is a file "
        "(set run_dir= or MPISTYLE_RUNS_DIR)"
    ]
    assert not (tmp_path / "out.mp4").exists()
