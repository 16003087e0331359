"""Many videos in one job (``inputs=``), the real program under mpirun: every good video delivered
as its single job would be, a bad one failing alone, per-video styles, and a killed batch
resumed without delivering anything twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mpistyle.video import probe
from test_bad_inputs import _corrupt_packets

from conftest import MPI_ENV, TESTS, mpistyle_command, run_mpistyle

TINY = ["device=cpu", "report.preview_frames=0", "report.progress=log"]


def _times(path: Path) -> list[float]:
    """Every frame's presentation time, in seconds (the containers' clocks differ)."""
    info = probe(str(path))
    return [round(float((pts - info.frame_pts[0]) * info.time_base), 3) for pts in info.frame_pts]


def _videos(video: Callable[..., Path], folder: Path) -> Path:
    """Three real videos of other containers and sizes, and one that is no video at all."""
    folder.mkdir()
    video("videos/a.mp4", frames=24, width=64, height=48)
    video("videos/b.mkv", frames=30, width=80, height=60)
    video("videos/c.mov", frames=18, width=96, height=54, fps=24)
    (folder / "d.mp4").write_bytes(b"this upload is not a video" * 100)
    (folder / "notes.txt").write_text("not taken: not a video's name\n")
    return folder


@pytest.mark.mpi
def test_a_folder_of_mixed_videos_is_done_with_the_bad_one_failing_alone(video: Callable[..., Path], tmp_path: Path) -> None:
    videos = _videos(video, tmp_path / "videos")
    styled = tmp_path / "styled"
    done = run_mpistyle(f"inputs={videos}", f"output_dir={styled}", *TINY, ranks=2)
    assert done.returncode == 8, done.stderr  # some videos failed
    assert "1 of 4 videos failed (first: " in done.stderr
    for name in ("a", "b", "c"):
        source = next(videos.glob(f"{name}.*"))
        assert _times(styled / f"{name}.mp4") == _times(source)
        assert not (styled / f"{name}.mp4.error.json").exists()
    failure = json.loads((styled / "d.mp4.error.json").read_text())
    assert failure["exit_code"] == 3 and "not a video" in failure["error"]
    assert not (styled / "d.mp4").exists()
    report = json.loads((styled / "batch-report.json").read_text())
    assert (report["videos"], report["done"], report["failed"]) == (4, 3, 1)
    assert [v["status"] for v in report["per_video"]] == ["done", "done", "done", "failed"]
    assert report["frames"] == 24 + 30 + 18 and len(report["per_rank_busy"]) == 2
    # Each video is the same file its own single-video job writes.
    single = tmp_path / "single-b.mp4"
    alone = run_mpistyle(f"input={videos / 'b.mkv'}", f"output={single}", *TINY)
    assert alone.returncode == 0, alone.stderr
    assert single.read_bytes() == (styled / "b.mp4").read_bytes()


def test_a_jsonl_file_gives_each_video_its_own_style_and_refuses_what_a_line_may_not_set(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    clip = video("clip.mp4", frames=12, width=64, height=48)
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"input": "clip.mp4", "output": "out/clip-5.mp4", "model.style": 5},
        {"input": "clip.mp4", "output": "out/clip-19.mp4", "model.style": 19},
        {"input": "clip.mp4", "output": "out/clip-x.mp4", "output_dir": "/"},
        {"input": "clip.mp4", "output": "out/clip-img.mp4", "model.style_image": "painting.jpg"},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_mpistyle(f"inputs={jobs}", *TINY)
    assert done.returncode == 8, done.stderr
    out = tmp_path / "out"
    assert (out / "clip-5.mp4").read_bytes() != (out / "clip-19.mp4").read_bytes()
    refused = json.loads((out / "clip-x.mp4.error.json").read_text())
    assert refused["exit_code"] == 2 and "sets output_dir, which a batch line may not" in refused["error"]
    wrong_model = json.loads((out / "clip-img.mp4.error.json").read_text())
    assert wrong_model["exit_code"] == 2 and "style_image" in wrong_model["error"]
    alone = run_mpistyle(f"input={clip}", f"output={tmp_path / 'alone-5.mp4'}", "model.style=5", *TINY)
    assert alone.returncode == 0, alone.stderr
    assert (tmp_path / "alone-5.mp4").read_bytes() == (out / "clip-5.mp4").read_bytes()
    report = json.loads((tmp_path / "batch-report.json").read_text())  # beside the JSONL: no output_dir
    assert [v["status"] for v in report["per_video"]] == ["done", "done", "failed", "failed"]


@pytest.mark.mpi
def test_a_killed_batch_resumes_without_delivering_anything_twice(video: Callable[..., Path], tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, frames in (("a", 72), ("b", 66), ("c", 60)):
        video(f"videos/{name}.mp4", frames=frames, width=64, height=48, gop=6)
    styled = tmp_path / "styled"
    args = [f"inputs={videos}", f"output_dir={styled}", "video.segment_seconds=0.5", *TINY]
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    job = subprocess.Popen(mpistyle_command(*args, ranks=2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (styled / "a.mp4").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGTERM)  # mpirun and both ranks, as scancel would
    _, stopped_log = job.communicate(timeout=60)
    assert (styled / "a.mp4").exists()
    first = (styled / "a.mp4").stat().st_mtime_ns
    done = run_mpistyle(*args, ranks=2)
    assert done.returncode == 0, done.stderr
    markers = sorted(p.name for p in (styled / ".mpistyle-delivered").glob("*"))
    assert (styled / "a.mp4").stat().st_mtime_ns == first, (markers, stopped_log[-3000:], done.stderr[-3000:])  # delivered once
    report = json.loads((styled / "batch-report.json").read_text())
    assert report["per_video"][0]["status"] == "delivered before"
    for name, frames in (("a", 72), ("b", 66), ("c", 60)):
        assert len(probe(str(styled / f"{name}.mp4")).frame_pts) == frames


@pytest.mark.parametrize(
    "args, message",
    [
        (["inputs=videos", "output=x.mp4"], "inputs= (a batch) takes output_dir=, not input= or output="),
        (["input=a.mp4", "output=x.mp4", "output_dir=out"], "output_dir= is for a batch"),
        (["inputs=missing", "output_dir=out"], "inputs=missing: no such folder or file"),
        (["inputs=videos", "output_dir=out", "report.path=r.json"], "report.path names one file"),
        (["inputs=videos"], "add output_dir=FOLDER"),
    ],
)
def test_a_batch_that_cannot_be_done_is_refused_before_work(
    video: Callable[..., Path], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "videos").mkdir()
    video("videos/a.mp4")
    video("a.mp4")
    done = run_mpistyle(*args, *TINY, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def test_two_videos_with_the_same_contents_are_each_delivered_once(video: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    clip = video("videos/a.mp4")
    (tmp_path / "videos" / "copy.mp4").write_bytes(clip.read_bytes())  # the same upload under two names
    styled = tmp_path / "styled"
    first = run_mpistyle(f"inputs={tmp_path / 'videos'}", f"output_dir={styled}", *TINY)
    assert first.returncode == 0, first.stderr
    again = run_mpistyle(f"inputs={tmp_path / 'videos'}", f"output_dir={styled}", *TINY)
    assert again.returncode == 0, again.stderr
    report = json.loads((styled / "batch-report.json").read_text())
    assert [v["status"] for v in report["per_video"]] == ["delivered before", "delivered before"]
    assert (styled / "a.mp4").read_bytes() == (styled / "copy.mp4").read_bytes()


def test_two_stop_signals_never_come_between_an_output_and_its_delivered_record(tmp_path: Path) -> None:
    # The second of two signals ends the process at once (scancel's SIGTERM and mpirun's copy of
    # it): with both arriving as the output is renamed into place, the record is still written.
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mpistyle import signals\n"
        "from mpistyle.files import replacing\n"
        "signals.install()\n"
        "out = Path(sys.argv[1])\n"
        "def record():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    Path(str(out) + '.delivered').write_text('yes')\n"
        "with replacing(out, then=record) as partial:\n"
        "    partial.write_bytes(b'video')\n"
        "print('not reached: the second signal ends the process')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.mp4")], capture_output=True, text=True)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert (tmp_path / "out.mp4").read_bytes() == b"video"
    assert (tmp_path / "out.mp4.delivered").read_text() == "yes"
    assert "not reached" not in done.stdout


@pytest.mark.mpi
def test_a_video_that_fails_while_scored_leaves_the_next_video_whole(video: Callable[..., Path], tmp_path: Path) -> None:
    # The ranks stop mid-video; the next video starts with no stale message between them.
    damaged = _corrupt_packets(tmp_path)
    good = video("good.mp4", frames=30, width=64, height=48)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{damaged}\n{good}\n")
    styled = tmp_path / "styled"
    done = run_mpistyle(f"inputs={listing}", f"output_dir={styled}", "on_damage=fail", "video.segment_seconds=0", *TINY, ranks=2)
    assert done.returncode == 8, done.stderr
    failure = json.loads((styled / "corrupt-packets.mp4.error.json").read_text())
    assert failure["exit_code"] == 3 and "damaged" in failure["error"]
    assert _times(styled / "good.mp4") == _times(good)
