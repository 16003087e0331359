"""Many videos in one job (``inputs=``), the real program under mpirun: every good video delivered
as its single job would be, a bad one failing alone, per-video styles, and a killed batch
resumed without delivering anything twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mpistyle import batch
from mpistyle.batch_inputs import BatchItem
from mpistyle.files import replacing
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_a_batch_asking_for_a_gpu_where_there_is_none_is_refused_once(video: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    video("videos/a.mp4")
    video("videos/b.mp4", start=24)
    done = run_mpistyle("inputs=videos", "output_dir=out", "report.preview_frames=0", "device=cuda", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "device=cuda but this node has no usable CUDA GPU" in done.stderr
    assert not (tmp_path / "out" / "a.mp4.error.json").exists()  # not every video's failure, the job's


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


def test_a_delivered_record_holds_only_once_its_output_is_in_place(tmp_path: Path) -> None:
    # The record is written just before the rename (from the root's delivery thread, where no
    # signal can be held off): a stop between the two leaves a record no output matches.
    output = tmp_path / "styled" / "a.mp4"
    output.parent.mkdir()
    item = BatchItem("videos/a.mp4", tmp_path / "a.mp4", output)

    class Killed(Exception):
        pass

    def killed_after_the_record(partial: Path) -> None:
        batch._mark_delivered(item, "key", partial)
        raise Killed

    with pytest.raises(Killed), replacing(output, ready=killed_after_the_record) as partial:
        partial.write_bytes(b"new video")
    assert not output.exists() and not batch._delivered(item, "key")  # done again
    output.write_bytes(b"an older video")  # what an earlier run left there does not match it either
    assert not batch._delivered(item, "key")
    with replacing(output, ready=lambda partial: batch._mark_delivered(item, "key", partial)) as partial:
        partial.write_bytes(b"new video")
    assert batch._delivered(item, "key") and not batch._delivered(item, "other settings")


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


@pytest.mark.mpi
def test_one_queue_feeds_every_rank_and_delivers_each_video_while_the_next_are_scored(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for number in range(6):  # one segment each, each its own contents (no staged segment shared)
        video(f"videos/v{number}.mp4", frames=12, width=64, height=48, fps=12, gop=12, start=12 * number)
    styled = tmp_path / "styled"
    done = run_mpistyle(f"inputs={videos}", f"output_dir={styled}", "staging.keep=true", *TINY, ranks=2)
    assert done.returncode == 0, done.stderr
    reports = [json.loads((styled / f"v{number}.mp4.report.json").read_text()) for number in range(6)]
    assert all(report["output"]["segments"] == 1 for report in reports)
    # A video of one segment is scored by one rank: both ranks scored videos, taken from one queue
    # (video by video, the ranks would take turns waiting).
    assert {rank["rank"] for report in reports for rank in report["per_rank"] if rank["frames"]} == {0, 1}
    # Delivered as it was done: the first video was in place before the last one was staged.
    last_staged = max(p.stat().st_mtime_ns for p in Path(reports[-1]["staging"]).glob("segment-*.h5"))
    assert (styled / "v0.mp4").stat().st_mtime_ns < last_staged
    assert [v["status"] for v in json.loads((styled / "batch-report.json").read_text())["per_video"]] == ["done"] * 6
    # Rank 0's progress across the batch: a line per video, with the time left once it can tell.
    assert "video 1/6 done" in done.stderr and "video 6/6 done" in done.stderr and " s to go" in done.stderr


def test_a_video_delivered_before_leaves_the_staging_of_one_of_the_same_contents_alone(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "videos").mkdir()
    clip = video("videos/a.mp4")
    (tmp_path / "videos" / "b.mp4").write_bytes(clip.read_bytes())
    args = [f"inputs={tmp_path / 'videos'}", f"output_dir={tmp_path / 'styled'}", *TINY]
    assert run_mpistyle(*args).returncode == 0
    (tmp_path / "styled" / "a.mp4").unlink()  # a is done again; b, delivered before, is tidied up after
    again = run_mpistyle(*args)
    assert again.returncode == 0, again.stderr
    report = json.loads((tmp_path / "styled" / "batch-report.json").read_text())
    assert [v["status"] for v in report["per_video"]] == ["done", "delivered before"]
    assert (tmp_path / "styled" / "a.mp4").read_bytes() == (tmp_path / "styled" / "b.mp4").read_bytes()
