"""``mpistyle-watch status``: the table, ``--json``, the exit code a probe alerts on, and no
secret in anything it prints; on records a real tick wrote, on records written through the real
Area API for the states that take long to reach (a job stuck in the queue, a video backing off,
one quarantined), and against Azurite."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from azurite import KEY, Azurite
from mpistyle.sample import make_video
from mpistyle.watch import status
from mpistyle.watch.areas import Area, BlobArea, LocalArea
from mpistyle.watch.names import job_name
from test_watch import local_overrides, watch_command

from conftest import MPI_ENV, TESTS

HOUR = 3600.0
DOCS = TESTS.parent / "docs" / "watch.md"


def env_here(**extra: str) -> dict[str, str]:
    """The environment for a watcher subprocess: the test helpers, and this tree's mpistyle."""
    return {**os.environ, **MPI_ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(watch_command(*args), cwd=cwd, env=env or env_here(), capture_output=True, text=True, timeout=300)


def run_status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``mpistyle-watch status ARGS`` in this process (fast): its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as ended:
        status.main(list(args))
    out, err = capsys.readouterr()
    return int(ended.value.code or 0), out, err


def at(hours_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours_ago)).isoformat(timespec="seconds")


def plant(work: Area, name: str, step: str, hours_in_step: float, **fields: Any) -> str:
    """A state record as the watcher writes it, in ``step`` since ``hours_in_step`` ago."""
    etag = f"0x8DC{abs(hash(name)) % 10**12:012X}"
    key = job_name(name, etag)
    data = {
        "input": name, "etag": etag, "size": 1000, "key": key, "job": None, "step": step, "owner": "gone:1",
        "lease_until": 0, "attempts": 0, "created": at(hours_in_step + 1), "updated": at(hours_in_step),
        "history": [{"step": "claimed", "at": at(hours_in_step + 1)}, {"step": step, "at": at(hours_in_step)}], **fields,
    }
    assert work.create_json(f"state/{key}.json", data) is not None
    return key


def plant_the_usual(work: Area) -> None:
    """One record of each kind that matters to status."""
    plant(work, "queued-for-ever.mp4", "submitted", 7, job="slurm:4242", submitted_at=time.time() - 7 * HOUR)
    plant(work, "running.mp4", "submitted", 1, job="slurm:4243")
    plant(work, "failing.mp4", "staged", 0.2, retries=5, retry_after=time.time() + 600, exit_code=6,
          failure="staging area problem (full, unwritable)")
    plant(work, "patient.mp4", "staged", 0.2, retries=2, retry_after=time.time() + 600, exit_code=137,
          failure="stopped by SIGKILL")
    plant(work, "poison.mp4", "quarantined", 2, attempts=1, exit_code=3, reason="not a usable video: moov atom not found")
    plant(work, "last-week.mp4", "done", 7 * 24, output="last-week.mp4", job="slurm:17")


def rows(table: str) -> dict[str, str]:
    """The table's rows by video name (the first word after the mark column)."""
    lines = table.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:1] == ["VIDEO"])
    found = {}
    for line in lines[header + 1:]:
        if not line.startswith(("! ", "  ")):
            break
        found[line[2:].split()[0]] = line
    return found


def stuck_names(table: str) -> set[str]:
    return {name for name, line in rows(table).items() if line.startswith("!")}


@pytest.fixture
def work(tmp_path: Path) -> tuple[LocalArea, list[str]]:
    (tmp_path / "work").mkdir()
    area = LocalArea("work", str(tmp_path / "work"))
    plant_the_usual(area)
    return area, [f"storage.work.root={tmp_path / 'work'}"]


# -- on a real tick's records -------------------------------------------------------------------------


def test_status_of_what_a_real_tick_did(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path)
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2, width=32, height=24)
    (tmp_path / "inbox" / "notes.txt").write_text("not a video name: refused unread")
    tick = run_cli(tmp_path, *overrides)
    assert tick.returncode == 0, tick.stderr
    state = tmp_path / "work" / "state"
    before = {p.name: p.read_bytes() for p in state.iterdir()}

    shown = run_cli(tmp_path, "status", *overrides)  # the tick's own overrides, as a probe would give them
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1] == "2 record(s): 1 done, 1 quarantined; 0 stuck"
    assert re.search(r"VIDEO +VERSION +STATE +ATT +RETRY +AGE +IN STEP +JOB +LAST ERROR", shown.stdout)
    found = rows(shown.stdout)
    assert found["clip.mp4"].split()[2] == "done" and "local:" in found["clip.mp4"]
    assert found["notes.txt"].split()[2] == "quarantined" and "not a video name" in found["notes.txt"]

    listed = run_cli(tmp_path, "status", "--json", *overrides)
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    records = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in state.glob("*.json")}
    assert report["records"] == 2 and report["stuck"] == 0 and report["steps"] == {"done": 1, "quarantined": 1}
    for video in report["videos"]:
        record = records[video["key"]]
        assert (video["input"], video["etag"], video["step"]) == (record["input"], record["etag"], record["step"])
        assert video["final"] and not video["stuck"] and video["created"] == record["created"]
        assert video["step_since"] == record["history"][-1]["at"] and 0 <= video["in_step_s"] < 300
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before  # status writes nothing


# -- stuck, and the exit code ------------------------------------------------------------------------


def test_stuck_past_the_threshold_or_retried_too_often(work: tuple[LocalArea, list[str]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, overrides = work
    code, out, _ = run_status(capsys, *overrides, "--stuck-after", "6h")
    assert code == status.STUCK_EXIT == 10
    # Queued 7 h; and a video whose jobs failed 5 times (retry_alert) for reasons not its own.
    assert stuck_names(out) == {"queued-for-ever.mp4", "failing.mp4"}
    assert list(rows(out))[:2] == ["queued-for-ever.mp4", "failing.mp4"]  # stuck first, the longest first
    assert set(rows(out)) == {"queued-for-ever.mp4", "failing.mp4", "running.mp4", "patient.mp4", "poison.mp4"}
    assert "1 final record(s) that ended more than 1d ago not shown" in out  # last week's, until --all
    failing = rows(out)["failing.mp4"].split()
    assert failing[3:6] == ["staged", "0", "5"] and "exit 6: staging area problem" in rows(out)["failing.mp4"]
    assert "2 9m" in rows(out)["patient.mp4"] or "2 10m" in rows(out)["patient.mp4"]  # retries, and the wait left

    code, out, _ = run_status(capsys, *overrides, "--stuck-after", "8h", "retry_alert=6")
    assert (code, stuck_names(out)) == (0, set())  # a quarantined video is final, never stuck

    # The threshold's default is the config's stuck_after_s (12 h): only the retried one; set lower, both submitted.
    code, out, _ = run_status(capsys, *overrides)
    assert (code, stuck_names(out)) == (10, {"failing.mp4"})
    code, out, _ = run_status(capsys, *overrides, "stuck_after_s=1800", "retry_alert=6")
    assert (code, stuck_names(out)) == (10, {"queued-for-ever.mp4", "running.mp4"})

    code, out, _ = run_status(capsys, "--all", *overrides, "retry_alert=6")
    assert code == 0 and "last-week.mp4" in rows(out) and list(rows(out))[-1] == "last-week.mp4"


def test_json_gives_every_field_and_the_docs_list_them(work: tuple[LocalArea, list[str]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, overrides = work
    code, out, _ = run_status(capsys, "--json", "--stuck-after", "6h", *overrides)
    assert code == 10
    report = json.loads(out)
    assert report["records"] == 6 and report["stuck"] == 2 and report["stuck_after_s"] == 6 * HOUR
    assert report["retry_alert"] == 5 and report["recent_s"] == 86400 and len(report["videos"]) == 5
    videos = {video["input"]: video for video in report["videos"]}
    queued = videos["queued-for-ever.mp4"]
    assert queued["stuck"] and queued["stuck_why"].startswith("submitted for 7h") and queued["job"] == "slurm:4242"
    assert abs(queued["in_step_s"] - 7 * HOUR) < 120 and abs(queued["age_s"] - 8 * HOUR) < 120
    failing = videos["failing.mp4"]
    assert failing["stuck"] and "retry_alert=5" in failing["stuck_why"] and failing["backing_off"]
    assert failing["retries"] == 5 and failing["exit_code"] == 6 and failing["failure"].startswith("staging area")
    assert datetime.fromisoformat(failing["retry_after"]) > datetime.now(UTC)
    poison = videos["poison.mp4"]
    assert poison["final"] and not poison["stuck"] and poison["reason"].startswith("not a usable video")
    assert not videos["patient.mp4"]["stuck"] and videos["patient.mp4"]["backing_off"]

    documented = DOCS.read_text()
    for key in [*report, *queued]:
        assert f"`{key}`" in documented, f"docs/watch.md does not list the status key {key}"


def test_no_secret_is_ever_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    token = "sv=2024-01-01&ss=b&srt=co&sp=rl&sig=VERBATIMSIGNATURE0123"
    monkeypatch.setenv("MPISTYLE_INPUT_CREDENTIAL", token)  # the watcher's env, as a probe has it
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "a-client-secret-value-42")
    (tmp_path / "work").mkdir()
    area = LocalArea("work", str(tmp_path / "work"))
    plant(area, "clip.mp4", "staged", 13, exit_code=9, failure=f"storage: https://acct.blob.core.windows.net/in?{token}")
    plant(area, "other.mp4", "staged", 0.1, failure="login failed with a-client-secret-value-42\nsecond line")
    plant(area, "poison.mp4", "quarantined", 1, reason="DefaultEndpointsProtocol=https;AccountName=a;AccountKey=PLANTEDKEY==;")
    for args in ([], ["--json"]):
        code, out, err = run_status(capsys, f"storage.work.root={tmp_path / 'work'}", *args)
        assert code == 10
        for secret in ("VERBATIMSIGNATURE0123", token, "a-client-secret-value-42", "PLANTEDKEY"):
            assert secret not in out + err
        assert "second line" not in out and "<redacted>" in out


def test_the_table_fits_120_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "work" / "state").mkdir(parents=True)
    area = LocalArea("work", str(tmp_path / "work"))
    deep = "projects/2024/client-x/raw/day3/camera-b/" + "a-very-long-take-name-" * 8 + "0001.mov"
    plant(area, deep, "submitted", 1, job="local:a-rather-long-host-name.cluster.example.org:123456:1700000000.25")
    plant(area, "東京の夜景とても長いファイル名のビデオ.mp4", "staged", 2, exit_code=1, failure="a bug " * 50)
    plant(area, "bell\x07.mp4", "quarantined", 1, reason="unusable name: has a control character or line break")
    plant(area, "odd.mp4", "dancing", 0.1)  # a step no watcher writes: no tick can move it
    (tmp_path / "work" / "state" / "broken-0123456789ab.json").write_text("{not json")
    (tmp_path / "work" / "state" / "not a key.json").write_text("{}")  # a name the watcher never writes: not a record
    code, out, _ = run_status(capsys, f"storage.work.root={tmp_path / 'work'}")
    assert code == 10 and stuck_names(out) == {"odd.mp4", "broken-0123456789ab"}
    for line in out.splitlines():
        assert sum(status._columns(char) for char in line) <= status.WIDTH, line
    found = rows(out)
    assert any(name.startswith("…") and name.endswith("0001.mov") for name in found)  # a long name keeps its end
    assert any(name.startswith("…") and name.endswith(".mp4") and "ビデオ" in name for name in found)
    assert "bell\\x07.mp4" in found and "\x07" not in out
    assert "unreadable" in found["broken-0123456789ab"] and "not JSON" in found["broken-0123456789ab"]
    assert "exit 1: a bug a bug" in out and out.count("a bug") < 50
    assert len(found) == 5


def test_bad_usage_or_configuration_exits_2_and_a_missing_area_9(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--stuck-after", "soon"], ["--stuck-after", "0"], ["--bogus"], ["nonsense_key=1"], ["stuck_after_s=0"]):
        code, _, err = run_status(capsys, *args)
        assert code == 2, args
        assert err.strip(), args
    # A SAS in the work area's URL is refused, as a tick refuses it, and never printed.
    code, _, err = run_status(capsys, "storage=blob", "storage.work.url='https://a.blob.core.windows.net/c?sv=1&sig=SASINURL'")
    assert code == 2 and "storage.work.url carries a SAS token" in err and "SASINURL" not in err
    # A work folder that is not there is said so, and not made.
    code, _, err = run_status(capsys, f"storage.work.root={tmp_path / 'nowhere'}")
    assert code == 9 and "does not exist" in err and not (tmp_path / "nowhere").exists()


# -- Azure Blob Storage (Azurite) ---------------------------------------------------------------------


@pytest.mark.azurite
def test_status_of_a_blob_work_area(azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    BlobServiceClient.from_connection_string(azurite.connection_string).create_container("status-work")
    sas = generate_container_sas("devstoreaccount1", "status-work", account_key=KEY,
                                 permission=ContainerSasPermissions(read=True, write=True, create=True, list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    monkeypatch.setenv("MPISTYLE_WORK_CREDENTIAL", sas)
    url = f"{azurite.endpoint}/status-work"
    area = BlobArea("work", url, credential_env="MPISTYLE_WORK_CREDENTIAL")
    plant_the_usual(area)
    plant(area, "leaky.mp4", "quarantined", 1, reason=f"could not read {url}?{sas}")
    env = env_here(MPISTYLE_WORK_CREDENTIAL=sas)
    # Read only: a SAS with read + list is enough for a probe.
    read_only = generate_container_sas("devstoreaccount1", "status-work", account_key=KEY,
                                       permission=ContainerSasPermissions(read=True, list=True),
                                       expiry=datetime.now(UTC) + timedelta(hours=1))
    probe = env_here(MPISTYLE_WORK_CREDENTIAL=read_only)

    shown = run_cli(tmp_path, "status", "storage=blob", f"storage.work.url={url}", "--stuck-after", "6h", env=probe)
    assert shown.returncode == 10, shown.stderr
    assert stuck_names(shown.stdout) == {"queued-for-ever.mp4", "failing.mp4"}
    assert "quarantined" in rows(shown.stdout)["leaky.mp4"]
    listed = run_cli(tmp_path, "status", "--json", "--all", "storage=blob", f"storage.work.url={url}", env=env)
    assert listed.returncode == 10, listed.stderr
    report = json.loads(listed.stdout)
    assert report["records"] == 7 and len(report["videos"]) == 7 and report["work"] == url
    assert {v["input"]: v["step"] for v in report["videos"]}["last-week.mp4"] == "done"
    for secret in (sas, read_only, sas.split("sig=")[1].split("&")[0], read_only.split("sig=")[1].split("&")[0]):
        assert secret not in shown.stdout + shown.stderr + listed.stdout + listed.stderr

    # A container that is not there (an account-wide connection string may list any), said so: exit 9.
    missing = run_cli(tmp_path, "status", "storage=blob", f"storage.work.url={azurite.endpoint}/no-such-container",
                      env=env_here(MPISTYLE_WORK_CREDENTIAL=azurite.connection_string))
    assert missing.returncode == 9 and "container does not exist" in missing.stderr, missing.stderr
    assert KEY not in missing.stdout + missing.stderr
