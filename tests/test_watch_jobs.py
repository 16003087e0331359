"""What the watcher's jobs get and how their ends are judged: no secret reaches a job (here or
on the real Slurm), a job outlives a killed watcher and is followed instead of started twice,
every job has a wall-clock limit, and only the input's own fault counts against the input."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from mpistyle.errors import ConfigError, StorageError
from mpistyle.sample import make_video
from mpistyle.watch import areas
from mpistyle.watch import config as watch_config
from mpistyle.watch.areas import open_area
from mpistyle.watch.runners import DEFAULT_SBATCH_SCRIPT, JobSpec, JobStatus, Runner, blame
from mpistyle.watch.watcher import Watcher, make_runner
from slurm_cluster import SlurmCluster
from test_watch import PYTHONPATH, local_overrides, run_watch, starts, states, watch_command

from conftest import MPI_ENV, TESTS
from media import decode_all

watch_config.register()

# Every kind of credential the watcher's environment may hold, under the names Azure's SDKs use,
# the project's own and a custom storage.*.credential_env.
SECRETS = {
    "AZURE_CLIENT_SECRET": "client-secret-1", "AZURE_CLIENT_CERTIFICATE_PASSWORD": "cert-password-2",
    "AZURE_STORAGE_ACCOUNT_KEY": "account-key-3", "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=key-4",
    "IDENTITY_HEADER": "identity-header-5", "MY_INPUT_SAS": "sv=2024&sig=sas-6", "MPISTYLE_WORK_CREDENTIAL": "sv=2024&sig=sas-7",
}


def watch_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        return compose("watch", overrides=list(overrides))


def model(target: str, **params: object) -> str:
    extra = "".join(f",'+model.{k}={v}'" for k, v in params.items())
    return f"job_overrides=['~model','+model._target_=frame_models.{target}'{extra}]"


def job_processes(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (a job's MPISTYLE_RUNS_DIR=...)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# -- 1. secrets never reach a job ------------------------------------------------------------------


def test_no_credential_reaches_a_local_job(tmp_path: Path) -> None:
    dump = tmp_path / "job-env.json"
    overrides = local_overrides(
        tmp_path, model("dump_env", path=dump), "storage.input.credential_env=MY_INPUT_SAS", "runner.env_pass=[MY_SETTING]"
    )
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    done = run_watch(tmp_path, *overrides, env={**SECRETS, "MY_SETTING": "kept", "UNLISTED_VARIABLE": "dropped"})
    assert done.returncode == 0, done.stderr
    handed = json.loads(dump.read_text())
    assert not set(SECRETS) & set(handed), sorted(set(SECRETS) & set(handed))
    assert "UNLISTED_VARIABLE" not in handed and handed["MY_SETTING"] == "kept"
    assert {"PATH", "PYTHONPATH", "MPISTYLE_RUNS_DIR", "OMPI_ALLOW_RUN_AS_ROOT"} <= set(handed)


def test_a_sas_inside_a_storage_url_is_refused(tmp_path: Path) -> None:
    url = "storage.input.url='https://acct.blob.core.windows.net/in?sv=2024&sig=TOPSECRETSIGNATURE'"
    done = run_watch(tmp_path, *local_overrides(tmp_path), url)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "MPISTYLE_INPUT_CREDENTIAL" in lines[0] and "ps" in lines[0], done.stderr
    assert "TOPSECRETSIGNATURE" not in done.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runner.env_pass=[MPISTYLE_INPUT_CREDENTIAL]", "a credential"),
        ("runner.env_pass=[AZURE_CLIENT_SECRET]", "a credential"),
        ("runner.sbatch_args=['--export=ALL']", "--export"),
        ("runner.sbatch_args=['--time=10']", "job_time_limit_s"),
        ("runner.sbatch_args=['--requeue']", "--no-requeue"),
        ("job_time_limit_s=0", "job_time_limit_s must be positive"),
    ],
)
def test_settings_that_would_undo_the_limits_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        watch_config.check(watch_cfg(override))


def test_the_default_sbatch_script_is_found_in_the_checkout() -> None:
    """runner=slurm without runner.script submits slurm/style.sbatch of this checkout."""
    assert DEFAULT_SBATCH_SCRIPT == TESTS.parent / "slurm" / "style.sbatch"
    assert DEFAULT_SBATCH_SCRIPT.is_file()


@pytest.mark.slurm
def test_no_credential_reaches_a_slurm_job(slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch exports only the allow-listed names (--export=...), whatever its own environment held."""
    script = tmp_path / "dump-env.sbatch"
    script.write_text('#!/bin/sh\nenv > "$MPISTYLE_RUNS_DIR/env.txt"\n')
    for name, value in {**SECRETS, **slurm.env(), "MY_SETTING": "kept", "UNLISTED_VARIABLE": "dropped"}.items():
        monkeypatch.setenv(name, value)
    cfg = watch_cfg("runner=slurm", f"runner.script={script}", "storage.input.credential_env=MY_INPUT_SAS",
                    "runner.env_pass=[MY_SETTING]")
    job = JobSpec("mpistyle-envtest", [], tmp_path / "job.log", tmp_path / "runs", tmp_path, time_limit_s=61)
    job.runs_dir.mkdir()
    handle = make_runner(cfg).start(job)
    info = slurm.wait(int(handle.removeprefix("slurm:")))
    assert info["JobState"] == "COMPLETED", (tmp_path / "job.log").read_text()
    assert info["TimeLimit"] == "00:02:00"  # job_time_limit_s, in minutes rounded up
    assert info["Requeue"] == "0"  # a failed node ends the job; the watcher's retry resumes it
    handed = dict(line.split("=", 1) for line in (job.runs_dir / "env.txt").read_text().splitlines() if "=" in line)
    assert not set(SECRETS) & set(handed), sorted(set(SECRETS) & set(handed))
    assert "UNLISTED_VARIABLE" not in handed and handed["MY_SETTING"] == "kept"
    assert handed["MPISTYLE_RUNS_DIR"] == str(job.runs_dir) and "SLURM_JOB_ID" in handed
    # No requeues from style.sbatch: a requeued job's run time starts over, past --time.
    assert handed["MPISTYLE_MAX_REQUEUES"] == "0"


# -- 2. a killed watcher's job runs on and is followed, not started twice ---------------------------


def test_a_watcher_killed_mid_job_leaves_the_job_to_the_next_watcher(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path, "lease_s=3", model("slow", seconds=0.5))
    make_video(tmp_path / "inbox" / "clip.mp4", frames=12)
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH}
    first = subprocess.Popen(watch_command(*overrides), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (record := states(tmp_path / "work").get("clip.mp4", {})).get("job"):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.kill()  # the watcher alone: its job runs in a session of its own
    first.communicate()
    pgid = int(record["job"].split(":")[2])
    os.killpg(pgid, 0)  # still there
    time.sleep(max(0.0, states(tmp_path / "work")["clip.mp4"]["lease_until"] - time.time()) + 0.2)

    second = run_watch(tmp_path, *overrides, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "following local:" in second.stderr and "started as" not in second.stderr, second.stderr
    record = states(tmp_path / "work")["clip.mp4"]
    assert record["step"] == "done" and starts(record) == 1
    assert len(decode_all(tmp_path / "outbox" / "clip.mp4")[0]) == 12


# -- 3. no job and no tick runs for ever -----------------------------------------------------------


def test_a_job_whose_wrapper_ends_while_it_is_looked_at_is_not_lost(tmp_path: Path) -> None:
    """The wrapper writes the job's exit code and ends between the runner's first look for the
    code and its scan for the job's processes (a busy host widens that gap): the code is read,
    not "the job stopped without recording an exit code" (a retry for nothing, or worse)."""
    from mpistyle.watch.runners import LocalRunner, _LocalHandle, _proc

    job = JobSpec(name="mpistyle-x", overrides=[], log=tmp_path / "job.log", runs_dir=tmp_path / "runs", folder=tmp_path)
    runner = LocalRunner()
    me = _proc(os.getpid())
    assert me is not None
    handle = str(_LocalHandle.here(os.getpid(), me.start))

    def wrapper_ends_meanwhile(*_: object) -> list[int]:
        job.exit_file.write_text("1\n")
        return []

    runner._members = wrapper_ends_meanwhile  # type: ignore[method-assign]
    assert runner.poll(handle, job) == JobStatus("failed", 1)


def test_a_hung_job_is_stopped_at_its_time_limit_and_counted(tmp_path: Path) -> None:
    """Under mpirun, which puts each rank in a process group of its own: every rank is stopped."""
    overrides = local_overrides(
        tmp_path, "job_time_limit_s=5", "job_kill_grace_s=1", "max_attempts=1", "runner.ranks=2", model("hang")
    )
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    began = time.monotonic()
    done = run_watch(tmp_path, *overrides, timeout=90)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 60
    record = states(tmp_path / "work")["clip.mp4"]
    assert record["step"] == "quarantined" and record["attempts"] == 1 and starts(record) == 1, record
    error = json.loads((tmp_path / "work" / "quarantine" / record["key"] / "error.json").read_text())
    assert error["reason"].startswith("failed 1 times") and "job_time_limit_s=5" in error["reason"]
    assert not job_processes(f"MPISTYLE_RUNS_DIR={tmp_path / 'scratch' / record['key'] / 'runs'}")


@pytest.mark.slurm
def test_a_slurm_job_running_past_its_limit_is_cancelled(
    slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/sh\nsleep 120\n")
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    runner = make_runner(watch_cfg("runner=slurm", f"runner.script={script}", "job_kill_grace_s=0"))
    job = JobSpec("mpistyle-limittest", [], tmp_path / "job.log", tmp_path / "runs", tmp_path, time_limit_s=1)
    submitted = time.time()
    handle = runner.start(job)
    deadline = time.monotonic() + 60
    while (status := runner.wait(handle, job, submitted)).state == "running":
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status.state == "timeout" and blame(status) == "attempt", status
    assert slurm.wait(int(handle.removeprefix("slurm:")))["JobState"] == "CANCELLED"


def _tick_script(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    script = TESTS.parent / "deploy" / "watch" / "mpistyle-watch-tick.sh"
    env = {**os.environ, "MPISTYLE_WATCH_ENV": str(tmp_path / "none.env"), "MPISTYLE_WATCH_LOCK": str(tmp_path / "lock"),
           "MPISTYLE_WATCH": "true", **settings}
    return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_the_tick_script_reports_a_wedged_tick(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    # A tick that never ends; its own session, so that killing it also kills the sleep holding the lock.
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"], start_new_session=True)
    try:
        while not lock.exists():
            time.sleep(0.01)
        time.sleep(0.2)  # flock has taken it
        fresh = _tick_script(tmp_path, MPISTYLE_WATCH_STALE_S="60")
        assert fresh.returncode == 0 and fresh.stderr == ""  # another tick at work: normal
        os.utime(lock, (time.time() - 120, time.time() - 120))  # that tick started two minutes ago
        wedged = _tick_script(tmp_path, MPISTYLE_WATCH_STALE_S="60")
        assert wedged.returncode == 75 and "wedged" in wedged.stderr and "MPISTYLE_WATCH_STALE_S=60" in wedged.stderr
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The sleep holds the lock too, and dies a moment after flock is reaped: wait until it is free.
    deadline = time.monotonic() + 10
    while subprocess.run(["flock", "--nonblock", str(lock), "true"]).returncode != 0:
        assert time.monotonic() < deadline, "the killed tick's lock was never released"
        time.sleep(0.05)
    assert _tick_script(tmp_path).returncode == 0  # the lock is free again
    assert "tick started" in lock.read_text()


def test_the_tick_script_stops_a_tick_past_its_timeout(tmp_path: Path) -> None:
    began = time.monotonic()
    done = _tick_script(tmp_path, MPISTYLE_WATCH="sleep", MPISTYLE_WATCH_ARGS="30", MPISTYLE_WATCH_TIMEOUT_S="1")
    assert done.returncode == 124 and "MPISTYLE_WATCH_TIMEOUT_S=1" in done.stderr
    assert time.monotonic() - began < 10


# -- 4. only the input's own fault counts against it -----------------------------------------------


def test_a_failure_that_is_not_the_inputs_is_retried_later_and_never_quarantined(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path, "max_attempts=1", "delete_inputs=true", "retry_backoff_s=0.05",
                                "retry_backoff_max_s=0.1", model("staging_full"))
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    for tick in (1, 2, 3):
        done = run_watch(tmp_path, *overrides)
        assert done.returncode == 0 and "1 retrying" in done.stderr, done.stderr
        assert "exit 6: a staging area problem" in done.stderr
        record = states(tmp_path / "work")["clip.mp4"]
        assert record["step"] == "staged" and record["attempts"] == 0 and record["retries"] == tick and starts(record) == tick
        assert record["exit_code"] == 6 and record["retry_after"] > 0
    assert (tmp_path / "inbox" / "clip.mp4").exists()
    assert not (tmp_path / "work" / "quarantine").exists()


class FakeRunner(Runner):
    """Ends every job as ``status`` says, after ``seconds``."""

    def __init__(self, status: JobStatus, seconds: float = 0.0) -> None:
        self.status, self.seconds, self.started = status, seconds, 0

    def start(self, job: JobSpec) -> str:
        self.started += 1
        return f"fake:{self.started}"

    def poll(self, handle: str, job: JobSpec) -> JobStatus:
        time.sleep(self.seconds)
        return self.status


def fake_watcher(tmp_path: Path, status: JobStatus, *overrides: str, videos: int = 1, seconds: float = 0.0) -> Watcher:
    cfg = watch_cfg(*local_overrides(tmp_path, *overrides))
    for index in range(videos):
        # A real video: the watcher probes each before its job (the fake runner scores none).
        make_video(tmp_path / "inbox" / f"clip{index}.mp4", frames=2, width=32, height=24, audio=0)
    areas = {label: open_area(label, cfg.storage[label]) for label in ("input", "output", "work")}
    return Watcher(cfg, areas, FakeRunner(status, seconds), owner="test:1")


ELSEWHERE = [
    JobStatus("failed", 2), JobStatus("failed", 4), JobStatus("failed", 5), JobStatus("failed", 6), JobStatus("failed", 7),
    JobStatus("failed", 9), JobStatus("failed", 137), JobStatus("failed", 143), JobStatus("lost", detail="gone"),
    JobStatus("failed", 143, "CANCELLED"), JobStatus("failed", None, "NODE_FAIL"), JobStatus("failed", 1, "PREEMPTED"),
    JobStatus("failed", 3, "OUT_OF_MEMORY"),
]
# A crash may be the input's doing (a decoder meeting what it cannot handle).
CRASHES = [JobStatus("failed", 128 + 11), JobStatus("failed", 128 + 6), JobStatus("failed", 128 + 7)]


@pytest.mark.parametrize("status", ELSEWHERE, ids=lambda s: f"{s.state}-{s.exit_code}-{s.detail}")
def test_anyone_elses_fault_backs_off_and_never_counts(tmp_path: Path, status: JobStatus) -> None:
    watcher = fake_watcher(tmp_path, status, "max_attempts=1", "retry_backoff_s=100", "retry_backoff_max_s=150")
    assert watcher.tick() == {"retrying": 1}
    record = states(tmp_path / "work")["clip0.mp4"]
    assert record["step"] == "staged" and record["attempts"] == 0 and record["retries"] == 1
    assert 90 < record["retry_after"] - time.time() <= 100
    assert watcher.tick() == {"waiting": 1} and watcher.runner.started == 1  # type: ignore[attr-defined]
    # Past the wait it runs again, and the next wait is twice as long, up to the cap.
    path = next((tmp_path / "work" / "state").glob("*.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "retry_after": 0}))
    assert watcher.tick() == {"retrying": 1} and watcher.runner.started == 2  # type: ignore[attr-defined]
    assert 140 < states(tmp_path / "work")["clip0.mp4"]["retry_after"] - time.time() <= 150


@pytest.mark.parametrize(
    ("status", "ticks", "attempts"),
    [
        # A bug, a crash or the time limit: counted, one attempt a tick, quarantined at max_attempts.
        (JobStatus("failed", 1), [{"failed": 1}, {"quarantined": 1}], 2),
        *((crash, [{"failed": 1}, {"quarantined": 1}], 2) for crash in CRASHES),
        (JobStatus("timeout", None, "ran past job_time_limit_s=5"), [{"failed": 1}, {"quarantined": 1}], 2),
        (JobStatus("timeout", 0, "TIMEOUT"), [{"failed": 1}, {"quarantined": 1}], 2),
        (JobStatus("failed", 3), [{"quarantined": 1}], 0),  # not a usable video: at once
    ],
    ids=lambda value: str(value),
)
def test_the_inputs_own_fault_counts(tmp_path: Path, status: JobStatus, ticks: list[dict[str, int]], attempts: int) -> None:
    watcher = fake_watcher(tmp_path, status, "max_attempts=2")
    assert [watcher.tick() for _ in ticks] == ticks
    record = states(tmp_path / "work")["clip0.mp4"]
    assert record["step"] == "quarantined" and record["attempts"] == attempts and starts(record) == max(attempts, 1)


def test_a_video_failing_again_and_again_elsewhere_is_reported_not_quarantined(tmp_path: Path) -> None:
    watcher = fake_watcher(tmp_path, JobStatus("failed", 6), "retry_alert=2", "retry_backoff_s=100")
    path = lambda: next((tmp_path / "work" / "state").glob("*.json"))  # noqa: E731
    assert watcher.tick() == {"retrying": 1}
    path().write_text(json.dumps({**json.loads(path().read_text()), "retry_after": 0}))
    assert watcher.tick() == {"stuck": 1}  # the second failure in a row: an error every tick from now on
    assert watcher.tick() == {"stuck": 1}  # while it waits, too
    record = states(tmp_path / "work")["clip0.mp4"]
    assert record["step"] == "staged" and record["attempts"] == 0 and record["retries"] == 2
    assert not (tmp_path / "work" / "quarantine").exists()


def test_a_stuck_video_makes_the_tick_exit_9(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path, "retry_alert=1", model("staging_full"))
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 9 and "1 stuck" in done.stderr and "not the input's" in done.stderr, done.stderr


def test_a_tick_starts_no_video_past_its_time_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher = fake_watcher(tmp_path, JobStatus("failed", 6), "tick_time_limit_s=0.05", videos=3, seconds=0.1)
    assert watcher.tick() == {"retrying": 1}
    assert "past tick_time_limit_s=0.05; 2 video(s) wait for the next tick" in caplog.text
    assert list(states(tmp_path / "work")) == ["clip0.mp4"]



def test_an_unreachable_blob_endpoint_is_retried_visibly_and_gives_up_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on port 9 here: every try is refused at once. The pauses are shortened (the
    # real ones, 2 s doubling, are the constant's), the tries and their logging are the real ones.
    monkeypatch.setenv("UNREACHABLE_TEST_SAS", "sv=2024-01-01&sp=rl&sig=NOT-TO-BE-SEEN")
    monkeypatch.setattr(areas, "_BLOB_FIRST_PAUSE_S", 0.01)
    area = areas.BlobArea("input", "http://127.0.0.1:9/devstoreaccount1/videos", credential_env="UNREACHABLE_TEST_SAS")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mpistyle.watch.areas"), pytest.raises(StorageError) as failed:
        area.list()
    assert time.monotonic() - started < 30
    tries = [record.getMessage() for record in caplog.records if "could not list blobs" in record.getMessage()]
    assert [line.split("; ")[-1].split(" in ")[0] for line in tries] == [f"try {n} of 5" for n in range(2, 6)]
    assert "after 5 tries" in str(failed.value)
    assert "NOT-TO-BE-SEEN" not in caplog.text + str(failed.value)
