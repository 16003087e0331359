"""mpistyle-watch against local folders, a real Azure Storage endpoint (Azurite) and a real
Slurm: outputs delivered once, poison inputs quarantined, concurrent and killed watchers, and
no secret in anything a run writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from azurite import KEY, Azurite
from mpistyle.sample import make_video
from mpistyle.watch.areas import LocalArea
from mpistyle.watch.names import job_name, output_name
from slurm_cluster import SlurmCluster

from conftest import MPI_ENV, TESTS
from media import audio_packets, decode_all

Watch = Callable[..., subprocess.CompletedProcess[str]]
# The tests' helpers, then the mpistyle this run imports (a worktree's src/ before the install).
PYTHONPATH = str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")


def watch_command(*overrides: str) -> list[str]:
    return [sys.executable, "-c", "from mpistyle.watch.watcher import main; main()", *overrides]


def run_watch(
    cwd: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH, **(env or {})}
    return subprocess.run(watch_command(*overrides), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def states(work: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["input"]: json.loads(p.read_text()) for p in (work / "state").glob("*.json")}


def starts(record: dict) -> int:
    return sum(1 for h in record["history"] if h["step"] == "submitted")


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/abs/path.mp4", "a/../b.mp4", "weird name (1).MOV", "ünïcode.mp4", "..", "x" * 400]
)
def test_job_names_are_safe_path_parts(name: str) -> None:
    key = job_name(name, "etag")
    assert "/" not in key and "\\" not in key and not key.startswith(".") and ".." not in key.replace("...", "")
    assert len(key) < 100


def test_different_names_or_versions_never_share_a_job() -> None:
    assert job_name("a b.mp4", "1") != job_name("a_b.mp4", "1")
    assert job_name("x/clip.mp4", "1") != job_name("y/clip.mp4", "1")
    assert job_name("clip.mp4", "1") != job_name("clip.mp4", "2")
    assert job_name("bad\nname.mp4", "1") != job_name("bad_name.mp4", "1")  # any name has a key (issue 12)
    assert output_name("dir/clip.MOV") == "dir/clip.MOV.mp4" and output_name("clip.mp4") == "clip.mp4"
    assert output_name("noext") == "noext.mp4"


# -- local folders ---------------------------------------------------------------------------------


def local_overrides(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return [
        f"storage.input.root={tmp_path / 'inbox'}", f"storage.output.root={tmp_path / 'outbox'}",
        f"storage.work.root={tmp_path / 'work'}", f"workdir={tmp_path / 'scratch'}", *extra,
    ]


def test_local_flow_good_bad_and_nothing_twice(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    make_video(inbox / "clip.mp4", frames=8)
    make_video(inbox / "sub" / "clip.mkv", frames=6)  # the same stem in another folder
    (inbox / "notes.mp4").write_text("this is not a video")
    first = run_watch(tmp_path, *local_overrides(tmp_path))
    assert first.returncode == 0, first.stderr
    outbox = tmp_path / "outbox"
    assert len(decode_all(outbox / "clip.mp4")[0]) == 8
    assert len(decode_all(outbox / "sub" / "clip.mkv.mp4")[0]) == 6
    assert audio_packets(outbox / "clip.mp4") == audio_packets(inbox / "clip.mp4")
    assert json.loads((outbox / "clip.mp4.report.json").read_text())["frames"] == 8
    assert (outbox / "clip.mp4.preview.png").exists()

    work = tmp_path / "work"
    records = states(work)
    assert {k: v["step"] for k, v in records.items()} == {"clip.mp4": "done", "sub/clip.mkv": "done", "notes.mp4": "quarantined"}
    bad_key = records["notes.mp4"]["key"]
    error = json.loads((work / "quarantine" / bad_key / "error.json").read_text())
    # Refused by the probe on the watcher's host, before any job (test_watch_flood.py).
    assert error["input"] == "notes.mp4" and error["exit_code"] == 3 and starts(records["notes.mp4"]) == 0
    assert "not a video" in error["reason"] and "what_to_do" in error
    assert (work / "quarantine" / bad_key / "input.mp4").read_text() == "this is not a video"  # a fixed name
    assert (work / "logs" / records["clip.mp4"]["key"] / "job.log").exists()
    assert not (tmp_path / "scratch" / records["clip.mp4"]["key"]).exists()  # local copies cleaned

    second = run_watch(tmp_path, *local_overrides(tmp_path))
    assert second.returncode == 0
    assert {name: starts(r) for name, r in states(work).items()} == {"clip.mp4": 1, "sub/clip.mkv": 1, "notes.mp4": 0}
    assert "started" not in second.stderr


def test_a_job_failing_every_time_is_quarantined_after_max_attempts(tmp_path: Path) -> None:
    # A plain RuntimeError inside the model: a bug (exit 1), which may be the input's doing.
    overrides = local_overrides(
        tmp_path, "max_attempts=2",
        "job_overrides=['~model','+model._target_=frame_models.fail_on_rank','+model.rank=0','+model.after_batches=0']",
    )
    make_video(tmp_path / "inbox" / "clip.mp4", frames=4)
    for tick, step in ((1, "staged"), (2, "quarantined")):  # one attempt a tick
        done = run_watch(tmp_path, *overrides)
        assert done.returncode == 0, done.stderr
        record = states(tmp_path / "work")["clip.mp4"]
        assert record["step"] == step and starts(record) == tick and record["attempts"] == tick
    error = json.loads((tmp_path / "work" / "quarantine" / record["key"] / "error.json").read_text())
    assert error["reason"].startswith("failed 2 times") and error["exit_code"] == 1


@pytest.mark.parametrize("max_batch", [1, 2])  # a job per video, or two videos a job (docs/watch.md)
def test_two_watchers_at_once_process_each_video_once(tmp_path: Path, max_batch: int) -> None:
    overrides = local_overrides(tmp_path, f"max_batch={max_batch}")
    for index in range(4):
        make_video(tmp_path / "inbox" / f"clip{index}.mp4", frames=6)
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH}
    watchers = [
        subprocess.Popen(watch_command(*overrides), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    logs = [w.communicate(timeout=300)[1] for w in watchers]
    assert all(w.returncode == 0 for w in watchers), logs
    records = states(tmp_path / "work")
    assert len(records) == 4 and all(r["step"] == "done" and starts(r) == 1 for r in records.values())
    assert sum(log.count("started as") for log in logs) == 4
    assert sorted(p.name for p in (tmp_path / "outbox").glob("*.mp4")) == [f"clip{i}.mp4" for i in range(4)]
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_a_killed_watcher_is_taken_over_after_its_lease(tmp_path: Path) -> None:
    """The watcher and its job both killed (the job runs in a session of its own: see
    test_watch_jobs.py for a job that outlives its watcher): the job is lost, which is no fault
    of the input, so a later tick starts it again and it resumes from the staged GOPs."""
    overrides = local_overrides(tmp_path, "lease_s=8", "retry_backoff_s=0.1")
    make_video(tmp_path / "inbox" / "clip.mp4", frames=40, width=320, height=180, gop=4)
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH}
    first = subprocess.Popen(
        watch_command(*overrides), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "scratch").glob("*/staging/*/segment-*.h5")):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    record = states(tmp_path / "work")["clip.mp4"]
    os.killpg(first.pid, signal.SIGKILL)  # the watcher, mid-run
    os.killpg(int(record["job"].split(":")[2]), signal.SIGKILL)  # and its job (local:HOST:PGID:START)
    first.communicate()
    record = states(tmp_path / "work")["clip.mp4"]
    assert record["step"] == "submitted"

    busy = run_watch(tmp_path, *overrides)  # the lease is still the dead watcher's
    assert busy.returncode == 0 and "1 busy" in busy.stderr, busy.stderr
    assert states(tmp_path / "work")["clip.mp4"]["step"] == "submitted"
    time.sleep(8.5)
    second = run_watch(tmp_path, *overrides)
    assert second.returncode == 0 and "1 retrying" in second.stderr, second.stderr
    assert states(tmp_path / "work")["clip.mp4"]["attempts"] == 0  # not held against the input
    third = run_watch(tmp_path, *overrides)
    assert third.returncode == 0, third.stderr
    record = states(tmp_path / "work")["clip.mp4"]
    assert record["step"] == "done" and starts(record) == 2
    assert len(decode_all(tmp_path / "outbox" / "clip.mp4")[0]) == 40
    report = json.loads((tmp_path / "outbox" / "clip.mp4.report.json").read_text())
    assert report["frames_reused"] > 0  # the second attempt resumed from the staged GOPs


def test_jobs_are_not_handed_the_storage_secrets(tmp_path: Path) -> None:
    dump = tmp_path / "job-env.json"
    overrides = local_overrides(
        tmp_path, f"job_overrides=['~model','+model._target_=frame_models.dump_env','+model.path={dump}']",
        "storage.input.credential_env=MY_INPUT_SAS",
    )
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    secrets = {"MY_INPUT_SAS": "sv=2024&sig=SECRET1", "MPISTYLE_OUTPUT_CREDENTIAL": "sv=2024&sig=SECRET2",
               "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=SECRET3"}
    done = run_watch(tmp_path, *overrides, env=secrets)
    assert done.returncode == 0, done.stderr
    handed = json.loads(dump.read_text())
    assert not set(secrets) & set(handed) and "PYTHONPATH" in handed


def test_a_crash_right_after_recording_an_attempt_is_recovered(tmp_path: Path) -> None:
    """The record says 'submitted' but no job was ever started (the watcher died in between)."""
    overrides = local_overrides(tmp_path)
    make_video(tmp_path / "inbox" / "clip.mp4", frames=3)
    entry = LocalArea("input", str(tmp_path / "inbox")).list()[0]
    key = job_name(entry.name, entry.etag)
    copy = tmp_path / "scratch" / key / "input.mp4"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((tmp_path / "inbox" / "clip.mp4").read_bytes())
    record = {"input": "clip.mp4", "etag": entry.etag, "key": key, "step": "submitted", "job": None, "owner": "dead:1",
              "lease_until": 0, "attempts": 1, "local_input": str(copy), "history": []}
    (tmp_path / "work" / "state").mkdir(parents=True)
    (tmp_path / "work" / "state" / f"{key}.json").write_text(json.dumps(record))
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr
    record = states(tmp_path / "work")["clip.mp4"]
    assert record["step"] == "done" and record["attempts"] == 1  # only failures count, not the start that never ran
    assert len(decode_all(tmp_path / "outbox" / "clip.mp4")[0]) == 3


def test_one_unusable_name_does_not_stop_the_queue(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path)
    make_video(tmp_path / "inbox" / "a.mp4", frames=2)
    (tmp_path / "inbox" / "bell\x07.mp4").write_bytes(b"x")
    make_video(tmp_path / "inbox" / "z.mp4", frames=2)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr  # refused once, visibly, instead of an error every tick
    assert "control character" in done.stderr
    records = states(tmp_path / "work")
    assert {k: v["step"] for k, v in records.items()} == {"a.mp4": "done", "bell\x07.mp4": "quarantined", "z.mp4": "done"}
    assert (tmp_path / "work" / "quarantine" / records["bell\x07.mp4"]["key"] / "error.json").exists()
    again = run_watch(tmp_path, *overrides)
    assert again.returncode == 0 and "1 quarantined" in again.stderr, again.stderr


def test_the_scheduled_tick_script(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path)
    make_video(tmp_path / "inbox" / "clip.mp4", frames=4)
    env_file = tmp_path / "watch.env"
    watch = Path(sys.executable).with_name("mpistyle-watch")
    env_file.write_text(f"MPISTYLE_WATCH={watch}\nMPISTYLE_WATCH_ARGS=\"{' '.join(overrides)}\"\n")
    script = TESTS.parent / "deploy" / "watch" / "mpistyle-watch-tick.sh"
    env = {**os.environ, "MPISTYLE_WATCH_ENV": str(env_file), "MPISTYLE_WATCH_LOCK": str(tmp_path / "lock")}
    done = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert states(tmp_path / "work")["clip.mp4"]["step"] == "done"
    assert (tmp_path / "outbox" / "clip.mp4").exists()


def test_delete_inputs_removes_only_the_version_processed(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path, "delete_inputs=true")
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "inbox" / "clip.mp4").exists() and (tmp_path / "outbox" / "clip.mp4").exists()

    area = LocalArea("input", str(tmp_path / "inbox"))
    make_video(tmp_path / "inbox" / "again.mp4", frames=2)
    old = area.list()[0]
    os.utime(tmp_path / "inbox" / "again.mp4", ns=(1, 1))  # a re-upload: another version
    area.delete("again.mp4", old.etag)
    assert (tmp_path / "inbox" / "again.mp4").exists()


def test_unsafe_names_never_leave_the_output_folder(tmp_path: Path) -> None:
    from mpistyle.errors import StorageError
    from mpistyle.watch.areas import LocalArea

    area = LocalArea("output", str(tmp_path / "out"))
    for name in ("../escape.mp4", "/etc/x.mp4", "a/../../b.mp4", "ctl\x07.mp4"):
        with pytest.raises(StorageError, match="unsafe name"):
            area.upload(name, Path(__file__))
    assert not (tmp_path / "escape.mp4").exists()


# -- Azure Blob Storage (Azurite) ------------------------------------------------------------------


def blob_setup(azurite: Azurite, tag: str) -> tuple[dict[str, str], list[str], object]:
    """Containers for one test and SAS tokens scoped per area; returns env, overrides, service."""
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    names = {area: f"{tag}-{area}" for area in ("input", "output", "work")}
    permissions = {
        "input": ContainerSasPermissions(read=True, list=True),
        "output": ContainerSasPermissions(create=True, write=True),
        "work": ContainerSasPermissions(read=True, write=True, create=True, list=True, delete=True),
    }
    env, overrides = {}, []
    for area, container in names.items():
        service.create_container(container)
        sas = generate_container_sas(
            "devstoreaccount1", container, account_key=KEY, permission=permissions[area],
            expiry=datetime.now(UTC) + timedelta(hours=2),
        )
        env[f"MPISTYLE_{area.upper()}_CREDENTIAL"] = sas
        overrides.append(f"storage.{area}.url={azurite.endpoint}/{container}")
    return env, ["storage=blob", *overrides], service


def everything_written(console: str, folder: Path, service: object, containers: list[str]) -> str:
    """The console output, every text-like file under ``folder`` and every blob in ``containers``."""
    parts = [console]
    parts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix not in (".mp4", ".h5")]
    for container in containers:
        client = service.get_container_client(container)  # type: ignore[attr-defined]
        parts += [client.download_blob(b.name).readall().decode(errors="replace") for b in client.list_blobs()]
    return "\n".join(parts)


@pytest.mark.azurite
def test_blob_flow_two_watchers_quarantine_and_no_secrets(azurite: Azurite, tmp_path: Path) -> None:
    env, overrides, service = blob_setup(azurite, "flow")
    source = make_video(tmp_path / "clip.mp4", frames=8)
    inputs = service.get_container_client("flow-input")
    for name in ("clip.mp4", "again/clip.mp4", "corrupt.mp4"):
        data = source.read_bytes() if name != "corrupt.mp4" else source.read_bytes()[:3000]
        inputs.upload_blob(name, data)
    scratch = tmp_path / "scratch"
    command = watch_command(*overrides, f"workdir={scratch}")
    full_env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH, **env}
    watchers = [subprocess.Popen(command, cwd=tmp_path, env=full_env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=300)[1] for w in watchers]
    assert all(w.returncode == 0 for w in watchers), logs

    outputs = service.get_container_client("flow-output")
    names = sorted(b.name for b in outputs.list_blobs())
    assert names == sorted(f"{n}{s}" for n in ("clip.mp4", "again/clip.mp4") for s in ("", ".preview.png", ".report.json"))
    (tmp_path / "got.mp4").write_bytes(outputs.download_blob("again/clip.mp4").readall())
    assert len(decode_all(tmp_path / "got.mp4")[0]) == 8
    work = service.get_container_client("flow-work")
    work_names = [b.name for b in work.list_blobs()]
    records = [json.loads(work.download_blob(n).readall()) for n in work_names if n.startswith("state/")]
    assert sorted((r["input"], r["step"], starts(r)) for r in records) == [
        ("again/clip.mp4", "done", 1), ("clip.mp4", "done", 1), ("corrupt.mp4", "quarantined", 0)  # probed: no job
    ]
    assert any(n.startswith("quarantine/") and n.endswith("/error.json") for n in work_names)
    assert sum(log.count("started as") for log in logs) == 2

    # No secret anywhere: watcher logs, every file left under the test folder, every blob written.
    secrets = [*env.values(), KEY, *(v.split("sig=")[1].split("&")[0] for v in env.values())]
    written = everything_written("\n".join(logs), tmp_path, service, ["flow-output", "flow-work"])
    for secret in secrets:
        assert secret not in written


@pytest.mark.azurite
def test_sas_urls_given_as_overrides_are_refused(azurite: Azurite, tmp_path: Path) -> None:
    """Another config source: the SAS inside the container URLs on the command line, where ps
    and systemd's unit status show it. Refused (exit 2) before any storage is touched."""
    env, _, service = blob_setup(azurite, "sasurl")
    service.get_container_client("sasurl-input").upload_blob("clip.mp4", make_video(tmp_path / "c.mp4", frames=4).read_bytes())
    # Quoted: '?', '=' and '&' mean something to Hydra's override grammar.
    urls = [f"storage.{area}.url='{azurite.endpoint}/sasurl-{area}?{env[f'MPISTYLE_{area.upper()}_CREDENTIAL']}'" for area in
            ("input", "output", "work")]
    scratch = tmp_path / "scratch"
    done = run_watch(tmp_path, "storage=blob", *urls, f"workdir={scratch}", "storage.input.credential_env=null",
                     "storage.output.credential_env=null", "storage.work.credential_env=null")
    assert done.returncode == 2, done.stderr
    assert "storage.input.url carries a SAS token" in done.stderr and "MPISTYLE_INPUT_CREDENTIAL" in done.stderr
    assert not list(service.get_container_client("sasurl-work").list_blobs())
    assert not list(service.get_container_client("sasurl-output").list_blobs())
    signatures = [value.split("sig=")[1].split("&")[0] for value in env.values()]
    written = everything_written(done.stdout + done.stderr, tmp_path, service, ["sasurl-output", "sasurl-work"])
    for signature in signatures:
        assert signature not in written


@pytest.mark.azurite
def test_a_refused_upload_is_redacted_and_retried_next_tick(azurite: Azurite, tmp_path: Path) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    env, overrides, service = blob_setup(azurite, "refused")
    service.get_container_client("refused-input").upload_blob("clip.mp4", make_video(tmp_path / "c.mp4", frames=4).read_bytes())
    read_only = generate_container_sas(
        "devstoreaccount1", "refused-output", account_key=KEY, permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    scratch = f"workdir={tmp_path / 'scratch'}"
    first = run_watch(tmp_path, *overrides, scratch, env={**env, "MPISTYLE_OUTPUT_CREDENTIAL": read_only})
    assert first.returncode == 9
    assert "output storage refused to upload" in first.stderr
    assert read_only.split("sig=")[1].split("&")[0] not in first.stderr
    second = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert second.returncode == 0, second.stderr
    assert [b.name for b in service.get_container_client("refused-output").list_blobs()].count("clip.mp4") == 1


# -- load ------------------------------------------------------------------------------------------


def test_twelve_videos_through_two_concurrent_watchers(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path)
    sources = {}
    for index in range(12):
        path = make_video(tmp_path / "inbox" / f"v{index:02d}.mp4", frames=3 + index % 4, width=32, height=24, gop=3)
        sources[path.name] = len(decode_all(path)[0])
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": PYTHONPATH}
    watchers = [
        subprocess.Popen(watch_command(*overrides), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    logs = [w.communicate(timeout=900)[1] for w in watchers]
    assert all(w.returncode == 0 for w in watchers), logs
    records = states(tmp_path / "work")
    assert len(records) == 12 and all(r["step"] == "done" and starts(r) == 1 for r in records.values())
    for name, frames in sources.items():
        assert len(decode_all(tmp_path / "outbox" / name)[0]) == frames
    assert sum(log.count("started as") for log in logs) == 12
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]  # staging and copies all cleaned


# -- through the real Slurm --------------------------------------------------------------------------


@pytest.mark.azurite
@pytest.mark.slurm
def test_blob_to_slurm_end_to_end(azurite: Azurite, slurm: SlurmCluster, tmp_path: Path) -> None:
    env, overrides, service = blob_setup(azurite, "slurm")
    source = make_video(tmp_path / "clip.mp4", frames=12)
    service.get_container_client("slurm-input").upload_blob("clip.mp4", source.read_bytes())
    sbatch_args = "runner.sbatch_args=['--ntasks=2','--cpus-per-task=1']"
    watch = [*overrides, "runner=slurm", f"workdir={tmp_path / 'shared'}", sbatch_args]
    job_env = {**slurm.env(), **env, "MPISTYLE_PYTHON": sys.executable}
    first = run_watch(tmp_path, *watch, env=job_env)
    assert first.returncode == 0 and "started as slurm:" in first.stderr, first.stderr
    deadline = time.monotonic() + 240
    while True:
        tick = run_watch(tmp_path, *watch, env=job_env)
        assert tick.returncode == 0, tick.stderr
        if "1 done" in tick.stderr:
            break
        assert time.monotonic() < deadline, tick.stderr
        time.sleep(1)
    (tmp_path / "out.mp4").write_bytes(service.get_container_client("slurm-output").download_blob("clip.mp4").readall())
    assert len(decode_all(tmp_path / "out.mp4")[0]) == 12
    report = json.loads(service.get_container_client("slurm-output").download_blob("clip.mp4.report.json").readall())
    assert report["ranks"] == 2


def test_a_bad_override_carrying_a_secret_is_reported_redacted(tmp_path: Path) -> None:
    done = run_watch(tmp_path, "lease_s='https://a.blob.core.windows.net/c?sv=2024&sig=TOPSECRETSIGNATURE'")
    assert done.returncode == 2
    assert "lease_s" in done.stderr and "TOPSECRETSIGNATURE" not in done.stderr, done.stderr
