"""Flood control (issue 18, point 3): a flood of uploads or one absurd file cannot fill the
cluster's queue. At most ``max_active_jobs`` of the watchers' jobs queued or running and
``max_submit_per_tick`` started a tick (the rest wait, not downloaded, and start on later ticks),
and every video is probed on the watcher's host, with the jobs' own limits, before any job: one
the job would refuse is quarantined there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from mpistyle.errors import ConfigError
from mpistyle.sample import make_video
from mpistyle.watch import config as watch_config
from mpistyle.watch import runners
from mpistyle.watch.runners import JobSpec, JobStatus, LocalRunner
from slurm_cluster import SlurmCluster
from test_watch import local_overrides, run_watch, starts, states
from test_watch_names import QuickRunner, local_watcher, quarantine_record

from media import repeated_frames

watch_config.register()


class QueueRunner(QuickRunner):
    """Jobs that wait in a scheduler's queue (as Slurm's do) until :meth:`finish` ends them;
    their work is done at once, so a finished one is delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[str] = []

    def start(self, job: JobSpec) -> str:
        args = dict(o.split("=", 1) for o in job.overrides if "=" in o)
        if "inputs" not in args:
            handle = super().start(job)
        else:  # a batch: each line's video done as a job of its own would do it
            for line in Path(args["inputs"]).read_text().splitlines():
                paths = json.loads(line)
                super().start(replace(job, overrides=[f"input={paths['input']}", f"output={paths['output']}"]))
            handle = "quick:0"
        handle += f":{len(self.queued) + len(self.started)}"
        self.queued.append(handle)
        return handle

    def poll(self, handle: str, *job: JobSpec) -> JobStatus:
        return JobStatus("running") if handle in self.queued else JobStatus("done", 0)

    def active(self) -> int:
        return len(self.queued)

    def finish(self, count: int) -> None:
        del self.queued[:count]


def videos(tmp_path: Path, count: int, **kwargs: int) -> list[str]:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    names = [f"v{index}.mp4" for index in range(count)]
    for name in names:
        make_video(tmp_path / "inbox" / name, **{"frames": 2, "width": 32, "height": 24, "audio": 0, **kwargs})
    return names


def test_flood_limits_and_the_jobs_config_are_checked_before_any_video() -> None:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        for key in ("max_active_jobs", "max_submit_per_tick", "settings_wait_s"):
            with pytest.raises(ConfigError, match=f"{key} must be 0 \\(no limit\\) or more, got -1"):
                watch_config.check(compose("watch", overrides=[f"{key}=-1"]))
        # The limits the probe applies come from the job config: one that does not compose is
        # the operator's mistake, said once (exit 2), not a refusal of every video.
        with pytest.raises(ConfigError, match=r"job_overrides do not make a job config: Could not override 'limits\.nonesuch'"):
            watch_config.check(compose("watch", overrides=["job_overrides=['limits.nonesuch=3']"]))


# The ticks' outcomes as the queue's jobs end (each tick follows the first ``ends`` jobs' ends).
FLOOD = {
    # A job per video: two at a time.
    1: [(0, {"running": 2, "held": 3}), (0, {"running": 2, "held": 3}), (1, {"done": 1, "running": 2, "held": 2}),
        (2, {"done": 3, "running": 2}), (2, {"done": 5})],
    # Two videos a job: two jobs hold four videos; the last, alone, is a job of its own.
    2: [(0, {"running": 4, "held": 1}), (0, {"running": 4, "held": 1}), (1, {"done": 2, "running": 3}), (2, {"done": 5})],
}


@pytest.mark.parametrize("max_batch", FLOOD)
def test_max_active_jobs_holds_videos_undownloaded_until_jobs_end(tmp_path: Path, max_batch: int) -> None:
    names = videos(tmp_path, 5)
    runner = QueueRunner()
    watcher = local_watcher(tmp_path, "max_active_jobs=2", "max_submit_per_tick=0", f"max_batch={max_batch}", runner=runner)
    for tick, (ends, outcomes) in enumerate(FLOOD[max_batch]):
        runner.finish(ends)
        assert watcher.tick() == outcomes, tick
        if tick == 1:
            assert len(runner.queued) == 2  # the queue was full: nothing started
            held = [name for name in names if states(tmp_path / "work")[name]["step"] == "claimed"]
            assert held == names[2 * max_batch:]  # waiting, not failed, and never downloaded
            assert not set(held) & set(watcher.input.downloads)  # type: ignore[attr-defined]
    assert all(starts(record) == 1 for record in states(tmp_path / "work").values())
    assert sorted(p.name for p in (tmp_path / "outbox").glob("*.mp4")) == names


def test_max_submit_per_tick_starts_the_rest_on_later_ticks(tmp_path: Path) -> None:
    """Real ticks, real jobs: one job a tick, the others wait."""
    videos(tmp_path, 2)
    overrides = local_overrides(tmp_path, "max_submit_per_tick=1")
    first = run_watch(tmp_path, *overrides)
    assert first.returncode == 0 and "tick: 1 done, 1 held" in first.stderr, first.stderr
    assert "flood control: max_submit_per_tick=1 jobs started this tick" in first.stderr
    second = run_watch(tmp_path, *overrides)
    assert second.returncode == 0 and "tick: 2 done" in second.stderr and "held" not in second.stderr, second.stderr
    assert sorted(p.name for p in (tmp_path / "outbox").glob("*.mp4")) == ["v0.mp4", "v1.mp4"]


def test_a_local_job_still_running_counts_toward_max_active_jobs(tmp_path: Path) -> None:
    """A killed watcher's local job runs on (a session of its own) and takes its place."""
    folder = tmp_path / "left-running"
    folder.mkdir()
    env = {**os.environ, "MPISTYLE_RUNS_DIR": str(folder / "runs")}
    job = subprocess.Popen(["/bin/sh", "-c", runners._WRAPPER, str(folder / "exit_code"), "sleep", "60"],
                           env=env, start_new_session=True)
    try:
        runner = LocalRunner()
        assert runners._is_wrapper(job.pid) and not runners._is_wrapper(os.getpid())
        assert runner.active() >= 1
        videos(tmp_path, 1)
        held = run_watch(tmp_path, *local_overrides(tmp_path, "max_active_jobs=1"))
        assert held.returncode == 0 and "tick: 1 held" in held.stderr, held.stderr
        assert "max_active_jobs=1" in held.stderr and "started" not in held.stderr
        assert states(tmp_path / "work")["v0.mp4"]["step"] == "claimed" and not list((tmp_path / "scratch").rglob("*.mp4"))
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not runners._is_wrapper(job.pid)


# -- probe before submit ---------------------------------------------------------------------------

ABSURD = {
    # The jobs' limits (limits.* in job_overrides) are the probe's: one set of numbers.
    "over limits.pixels": (dict(width=64, height=48), "limits.pixels=1000", "frames of 64x48 are over limits.pixels=1000", True),
    "over limits.frames": (dict(frames=12), "limits.frames=10", "more than limits.frames=10 video frames", True),
    "over limits.duration_s": (dict(frames=36, fps=12), "limits.duration_s=2", "runs longer than limits.duration_s=2", True),
    "over limits.bytes": ({}, "limits.bytes=1000", "over limits.bytes=1000 (never downloaded)", False),
}


@pytest.mark.parametrize(("shape", "limit", "reason", "downloaded"), ABSURD.values(), ids=ABSURD.keys())
def test_an_absurd_video_is_quarantined_on_the_watcher_before_any_job(
    tmp_path: Path, shape: dict[str, int], limit: str, reason: str, downloaded: bool
) -> None:
    videos(tmp_path, 1, **shape)
    runner = QuickRunner()
    watcher = local_watcher(tmp_path, f"job_overrides=['{limit}']", runner=runner)
    assert watcher.tick() == {"quarantined": 1}
    assert runner.started == []  # no job, so nothing in any queue
    assert watcher.input.downloads == (["v0.mp4"] if downloaded else [])  # type: ignore[attr-defined]
    record = states(tmp_path / "work")["v0.mp4"]
    error = quarantine_record(tmp_path / "work", record["key"])
    assert reason in error["reason"] and error["exit_code"] == 3 and "limits.*" in error["what_to_do"], error
    assert str(tmp_path) not in json.dumps(error)  # the input's name, not this host's copy
    assert (tmp_path / "work" / "quarantine" / record["key"] / "input.mp4").exists() is downloaded


def test_a_frame_bomb_and_a_fake_video_never_reach_a_job_and_the_rest_go_on(tmp_path: Path) -> None:
    """Real tick: each bad input is refused on the watcher's host, by the project's own probe
    and limits, and the good video beside them is done."""
    (tmp_path / "inbox").mkdir()
    repeated_frames(tmp_path / "inbox" / "bomb.mp4", frames=400)  # a tiny file of many frames
    (tmp_path / "inbox" / "fake.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and nothing a demuxer can read" * 40)
    make_video(tmp_path / "inbox" / "good.mp4", frames=3, width=32, height=24)
    done = run_watch(tmp_path, *local_overrides(tmp_path, "job_overrides=['limits.frames=100']"))
    assert done.returncode == 0 and "tick: 1 done, 2 quarantined" in done.stderr, done.stderr
    assert done.stderr.count("started as") == 1
    records = states(tmp_path / "work")
    for name, reason in (("bomb.mp4", "more than limits.frames=100 video frames"), ("fake.mp4", "not a video FFmpeg can read")):
        assert records[name]["step"] == "quarantined" and starts(records[name]) == 0 and records[name]["job"] is None
        assert reason in quarantine_record(tmp_path / "work", records[name]["key"])["reason"]
        assert not (tmp_path / "work" / "logs" / records[name]["key"]).exists()  # no job, so no job log
    assert len(list((tmp_path / "outbox").glob("*.mp4"))) == 1


# -- through the real Slurm --------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_counts_the_watchers_jobs_in_its_queue(
    slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**slurm.env(), "MPISTYLE_PYTHON": sys.executable}
    held = subprocess.run(["sbatch", "--parsable", "--hold", "--job-name=mpistyle-flood-test", f"--output={tmp_path}/out",
                           "--wrap=true"], env=env, capture_output=True, text=True, check=True).stdout.split(";")[0].strip()
    other = subprocess.run(["sbatch", "--parsable", "--hold", "--job-name=someone-else", f"--output={tmp_path}/out",
                            "--wrap=true"], env=env, capture_output=True, text=True, check=True).stdout.split(";")[0].strip()
    try:
        for name, value in env.items():
            monkeypatch.setenv(name, value)  # the runner hands sbatch and squeue its own environment
        assert runners.SlurmRunner().active() == 1  # the held mpistyle- job; not the other one
        videos(tmp_path, 1)
        watch = local_overrides(tmp_path, "runner=slurm", "max_active_jobs=1")
        tick = run_watch(tmp_path, *watch, env=env)
        assert tick.returncode == 0 and "tick: 1 held" in tick.stderr and "started" not in tick.stderr, tick.stderr
    finally:
        subprocess.run(["scancel", held, other], env=env, check=False)
