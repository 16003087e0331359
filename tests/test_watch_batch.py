"""The watcher batching a tick's uploads (``max_batch``): the videos ready to start run as one
batch job (``inputs=`` a JSONL file), each record still moves on its own, and a poison video is
quarantined while the others of its batch are delivered. Real jobs throughout (the local runner,
and the real Slurm)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from mpistyle.errors import ConfigError
from mpistyle.sample import make_video
from mpistyle.watch import config as watch_config
from mpistyle.watch.areas import LocalArea
from mpistyle.watch.names import job_name
from slurm_cluster import SlurmCluster
from test_bad_inputs import _corrupt_packets
from test_watch import PYTHONPATH, local_overrides, run_watch, starts, states, watch_command

from conftest import MPI_ENV
from media import decode_all

watch_config.register()


def files_left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_max_batch_must_be_at_least_one() -> None:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        for value in (0, -2):
            with pytest.raises(ConfigError, match=rf"max_batch must be 1 or more .*got {value}"):
                watch_config.check(compose("watch", overrides=[f"max_batch={value}"]))
        watch_config.check(compose("watch", overrides=["max_batch=8"]))


def test_a_ticks_uploads_run_as_one_job_and_are_each_delivered(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path, "max_batch=3")
    frames = {"a.mp4": 6, "sub/b.mov": 4, "c.mkv": 5}
    (tmp_path / "inbox" / "sub").mkdir()
    for name, count in frames.items():
        make_video(tmp_path / "inbox" / name, frames=count)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr
    assert "tick: 3 done" in done.stderr, done.stderr

    records = states(tmp_path / "work")
    assert {name: r["step"] for name, r in records.items()} == dict.fromkeys(frames, "done")
    assert all(starts(r) == 1 and r["attempts"] == 0 for r in records.values())
    assert len({r["job"] for r in records.values()}) == 1 and len({r["batch"] for r in records.values()}) == 1
    assert done.stderr.count("started as") == 3 and "of 3)" in done.stderr  # one job, each video's start logged
    for name, count in frames.items():
        output = tmp_path / "outbox" / (name if name.endswith(".mp4") else name + ".mp4")
        assert len(decode_all(output)[0]) == count
        assert json.loads(output.with_name(output.name + ".report.json").read_text())["frames"] == count
        logs = tmp_path / "work" / "logs" / records[name]["key"]
        assert (logs / "job.log").exists() and (logs / "batch-report.json").exists()
    batch_report = json.loads((tmp_path / "work" / "logs" / records["a.mp4"]["key"] / "batch-report.json").read_text())
    assert batch_report["videos"] == 3 and batch_report["done"] == 3
    assert not files_left(tmp_path / "scratch")  # copies, the batch's list, log and staging: all removed

    again = run_watch(tmp_path, *overrides)
    assert again.returncode == 0 and "started" not in again.stderr, again.stderr


def test_a_poison_video_is_quarantined_and_the_rest_of_its_batch_delivered(tmp_path: Path) -> None:
    # Damaged packets pass the watcher's probe (it reads the index, decodes nothing); with
    # on_damage=fail the batch job refuses the video while scoring it.
    overrides = local_overrides(tmp_path, "max_batch=3", "job_overrides=['on_damage=fail']")
    make_video(tmp_path / "inbox" / "good1.mp4", frames=6)
    shutil.copyfile(_corrupt_packets(tmp_path), tmp_path / "inbox" / "poison.mkv")
    make_video(tmp_path / "inbox" / "good2.mp4", frames=4)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr

    records = states(tmp_path / "work")
    assert {name: r["step"] for name, r in records.items()} == {
        "good1.mp4": "done", "poison.mkv": "quarantined", "good2.mp4": "done"
    }
    assert len({r["job"] for r in records.values()}) == 1 and all(starts(r) == 1 for r in records.values())
    assert len(decode_all(tmp_path / "outbox" / "good1.mp4")[0]) == 6
    assert len(decode_all(tmp_path / "outbox" / "good2.mp4")[0]) == 4
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir() if p.suffix == ".mp4") == ["good1.mp4", "good2.mp4"]
    key = records["poison.mkv"]["key"]
    error = json.loads((tmp_path / "work" / "quarantine" / key / "error.json").read_text())
    # The batch's own reason for this video, not the job's: quarantined at once (exit 3).
    assert error["exit_code"] == 3 and error["reason"].startswith("the input is not a usable video: ")
    assert "damaged" in error["reason"] and "poison.mkv" in error["reason"]
    assert error["attempts"] == 0 and (tmp_path / "work" / "quarantine" / key / "input.mkv").exists()
    assert not files_left(tmp_path / "scratch")


def test_a_batch_failing_as_a_whole_holds_it_against_none_and_runs_each_alone(tmp_path: Path) -> None:
    """A bug (exit 1) ends the whole batch job: it may be any one video's doing, so none is
    counted; each runs in a job of its own next, where the failure counts (max_attempts=1)."""
    overrides = local_overrides(
        tmp_path, "max_batch=3", "max_attempts=1",
        "job_overrides=['~model','+model._target_=frame_models.fail_on_rank','+model.rank=0','+model.after_batches=0']",
    )
    for index in range(2):
        make_video(tmp_path / "inbox" / f"clip{index}.mp4", frames=4)
    first = run_watch(tmp_path, *overrides)
    assert first.returncode == 0 and "tick: 2 failed" in first.stderr, first.stderr
    records = states(tmp_path / "work")
    assert all(r["step"] == "staged" and r["attempts"] == 0 and r["alone"] and r["exit_code"] == 1 for r in records.values())
    assert len({r["job"] for r in records.values()}) == 1

    second = run_watch(tmp_path, *overrides)
    assert second.returncode == 0 and "tick: 2 quarantined" in second.stderr, second.stderr
    records = states(tmp_path / "work")
    assert all(r["step"] == "quarantined" and r["attempts"] == 1 and starts(r) == 2 for r in records.values())
    assert len({r["job"] for r in records.values()}) == 2 and all(r["batch"] is None for r in records.values())


def test_a_batch_recorded_but_never_started_is_started_again(tmp_path: Path) -> None:
    """The watcher died between recording the batch's start and starting it: each record says
    "submitted" with no job; the next tick finds no such job and starts them again, together."""
    overrides = local_overrides(tmp_path, "max_batch=2")
    for index in range(2):
        make_video(tmp_path / "inbox" / f"clip{index}.mp4", frames=3)
    (tmp_path / "work" / "state").mkdir(parents=True)
    for entry in LocalArea("input", str(tmp_path / "inbox")).list():
        key = job_name(entry.name, entry.etag)
        copy = tmp_path / "scratch" / key / "input.mp4"
        copy.parent.mkdir(parents=True)
        copy.write_bytes((tmp_path / "inbox" / entry.name).read_bytes())
        record = {"input": entry.name, "etag": entry.etag, "key": key, "step": "submitted", "job": None,
                  "batch": "0123456789abcdef", "owner": "dead:1", "lease_until": 0, "attempts": 0, "history": []}
        (tmp_path / "work" / "state" / f"{key}.json").write_text(json.dumps(record))
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0 and "tick: 2 done" in done.stderr, done.stderr
    records = states(tmp_path / "work")
    assert len({r["job"] for r in records.values()}) == 1 and {r["batch"] for r in records.values()} != {"0123456789abcdef"}
    assert all(len(decode_all(tmp_path / "outbox" / name)[0]) == 3 for name in records)


@pytest.mark.slurm
def test_a_batch_through_the_real_slurm(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Submitted once, followed by later ticks, each video judged and delivered on its own."""
    watch = local_overrides(tmp_path, "max_batch=4", "runner=slurm", "runner.sbatch_args=['--ntasks=2','--cpus-per-task=1']")
    make_video(tmp_path / "inbox" / "good.mp4", frames=6)
    (tmp_path / "inbox" / "poison.mp4").write_bytes(b"not a video at all" * 100)
    env = {**slurm.env(), "MPISTYLE_PYTHON": sys.executable}
    first = run_watch(tmp_path, *watch, env=env)
    # The poison never reaches Slurm (the watcher's probe refuses it); the good one is a batch of one.
    assert first.returncode == 0 and first.stderr.count("started as slurm:") == 1, first.stderr
    assert states(tmp_path / "work")["poison.mp4"]["step"] == "quarantined"
    deadline = time.monotonic() + 240
    while {r["step"] for r in states(tmp_path / "work").values()} & {"submitted", "finished"}:
        assert time.monotonic() < deadline, states(tmp_path / "work")
        time.sleep(1)
        tick = run_watch(tmp_path, *watch, env=env)
        assert tick.returncode == 0 and "started" not in tick.stderr, tick.stderr
    records = states(tmp_path / "work")
    assert {name: r["step"] for name, r in records.items()} == {"good.mp4": "done", "poison.mp4": "quarantined"}
    assert len(decode_all(tmp_path / "outbox" / "good.mp4")[0]) == 6
    assert json.loads((tmp_path / "outbox" / "good.mp4.report.json").read_text())["ranks"] == 2
    assert not files_left(tmp_path / "scratch")



def test_a_watcher_killed_mid_batch_leaves_the_job_to_the_next_watcher(tmp_path: Path) -> None:
    overrides = local_overrides(
        tmp_path, "max_batch=2", "lease_s=3", "job_overrides=['~model','+model._target_=frame_models.slow','+model.seconds=0.5']"
    )
    for index in range(2):
        make_video(tmp_path / "inbox" / f"clip{index}.mp4", frames=8)
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH}
    first = subprocess.Popen(watch_command(*overrides), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((records := states(tmp_path / "work")).get(f"clip{i}.mp4", {}).get("job") for i in range(2)):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.kill()  # the watcher alone: the batch job runs in a session of its own
    first.communicate()
    os.killpg(int(records["clip0.mp4"]["job"].split(":")[2]), 0)  # still there
    time.sleep(max(0.0, *(r["lease_until"] - time.time() for r in states(tmp_path / "work").values())) + 0.2)

    second = run_watch(tmp_path, *overrides, timeout=120)
    assert second.returncode == 0 and "tick: 2 done" in second.stderr, second.stderr
    assert "following local:" in second.stderr and "started as" not in second.stderr, second.stderr
    records = states(tmp_path / "work")
    assert all(r["step"] == "done" and starts(r) == 1 for r in records.values())
    assert all(len(decode_all(tmp_path / "outbox" / name)[0]) == 8 for name in records)
