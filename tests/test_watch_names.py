"""mpistyle-watch and the names it is handed: only video names are taken, one set of name rules
for every area, no symbolic links followed, distinct inputs never share an output, an older
upload never replaces a newer result, and nothing left behind (issue 12).

Most tests drive a :class:`Watcher` in this process with a runner that does a job's work in a
blink; one runs the real job to check the report a user gets."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from azurite import KEY, Azurite
from mpistyle.errors import StorageError
from mpistyle.formats import VIDEO_SUFFIXES
from mpistyle.report import public_report
from mpistyle.sample import make_video
from mpistyle.watch import config as watch_config
from mpistyle.watch.areas import Area, BlobArea, Entry, LocalArea
from mpistyle.watch.names import UnsafeName, check_name, job_name
from mpistyle.watch.runners import JobSpec, JobStatus, Runner
from mpistyle.watch.watcher import Watcher
from test_watch import local_overrides, run_watch, states

watch_config.register()

# -- helpers ------------------------------------------------------------------------------------


class QuickRunner(Runner):
    """Does a job's work at once: the input copied as the output, a report carrying the internal
    paths and host name a real one does, and a staging file where the job keeps its own."""

    def __init__(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code
        self.started: list[str] = []

    def start(self, job: JobSpec) -> str:
        args = dict(o.split("=", 1) for o in job.overrides if "=" in o)
        source, output = Path(args["input"]), Path(args["output"])
        staging = Path(args.get("staging.root", output.parent / "staging"))
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "segment-000000.h5").write_bytes(b"staged")
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.log.write_text("quick job\n")
        if self.exit_code == 0:
            shutil.copyfile(source, output)
            report = {"frames": 2, "run_id": "r1", "input": {"path": str(source)}, "output": {"path": str(output)},
                      "per_rank": [{"rank": 0, "host": socket.gethostname(), "frames": 2}]}
            output.with_name(output.name + ".report.json").write_text(json.dumps(report))
        self.started.append(job.name)
        return f"quick:{self.exit_code}"

    def poll(self, handle: str, *job: JobSpec) -> JobStatus:
        code = int(handle.split(":")[1])
        return JobStatus("done" if code == 0 else "failed", code)


class CountingArea(LocalArea):
    """A local input folder that remembers which names were downloaded."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.downloads: list[str] = []

    def download(self, name: str, dest: Path) -> None:
        self.downloads.append(name)
        super().download(name, dest)


def watch_cfg(tmp_path: Path, *extra: str) -> DictConfig:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        return compose("watch", overrides=local_overrides(tmp_path, *extra))


def local_watcher(tmp_path: Path, *extra: str, runner: Runner | None = None, owner: str = "here:1") -> Watcher:
    areas: dict[str, Area] = {
        "input": CountingArea("input", str(tmp_path / "inbox")),
        "output": LocalArea("output", str(tmp_path / "outbox")),
        "work": LocalArea("work", str(tmp_path / "work")),
    }
    return Watcher(watch_cfg(tmp_path, *extra), areas, runner or QuickRunner(), owner=owner)


def files_under(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        if folder.exists():
            yield from (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def quarantine_record(work: Path, key: str) -> dict[str, Any]:
    return json.loads((work / "quarantine" / key / "error.json").read_text())


def record_at(work: Path, entry: Entry, step: str, **extra: Any) -> str:
    """A state record left by an earlier tick; returns the job key."""
    key = job_name(entry.name, entry.etag)
    record = {"input": entry.name, "etag": entry.etag, "key": key, "step": step, "job": None, "owner": "dead:1",
              "lease_until": 0, "attempts": 1, "history": [], **extra}
    (work / "state").mkdir(parents=True, exist_ok=True)
    (work / "state" / f"{key}.json").write_text(json.dumps(record))
    return key


# -- 3: one set of name rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "/abs.mp4", "a/../b.mp4", "a/./b.mp4", "a//b.mp4", "dir/", "a\\b.mp4", "ctl\x07.mp4", "line\u2028.mp4",
     "bad\udcff.mp4", "tail./x.mp4", "p" * 252 + ".mp4", "d/" * 510 + "x.mp4"],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeName, match="unsafe name"):
        check_name(name, "output")


@pytest.mark.parametrize("name", ["a/b.mp4", "ünïcode.mp4", "weird name (1).MOV", "p" * 251 + ".mp4", "é" * 125 + ".mp4"])
def test_ordinary_names_pass(name: str) -> None:
    check_name(name, "output")


def test_a_backslash_no_longer_overwrites_a_folder_name(tmp_path: Path) -> None:
    area = LocalArea("output", str(tmp_path / "out"))
    area.upload("a/b.mp4", Path(__file__))
    with pytest.raises(StorageError, match="backslash"):
        area.upload("a\\b.mp4", Path(__file__))
    assert (tmp_path / "out" / "a" / "b.mp4").read_bytes() == Path(__file__).read_bytes()


@pytest.fixture
def blob_areas(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Containers made for one test, as BlobAreas holding an account SAS (as with a managed
    identity, a request may reach any container: only the name keeps it in its own)."""
    from azure.storage.blob import AccountSasPermissions, BlobServiceClient, ResourceTypes, generate_account_sas

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    sas = generate_account_sas(
        "devstoreaccount1", KEY, ResourceTypes(container=True, object=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True, delete=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    monkeypatch.setenv("NAMES_TEST_SAS", sas)

    def make(label: str, container: str, prefix: str = "") -> BlobArea:
        service.create_container(container)
        return BlobArea(label, f"{azurite.endpoint}/{container}", prefix, "NAMES_TEST_SAS")

    make.service = service  # type: ignore[attr-defined]
    return make


@pytest.mark.azurite
def test_blob_names_cannot_reach_another_container(blob_areas: Any, tmp_path: Path) -> None:
    output = blob_areas("output", "names-out", "results/")
    blob_areas("work", "names-other")
    source = tmp_path / "x.mp4"
    source.write_bytes(b"data")
    for name in ("../names-other/x.mp4", "../../names-other/x.mp4", "a/../../../names-other/x.mp4", "a\\b.mp4"):
        with pytest.raises(StorageError, match="unsafe name"):
            output.upload(name, source)
        with pytest.raises(StorageError, match="unsafe name"):
            output.download(name, tmp_path / "back.mp4")
        with pytest.raises(StorageError, match="unsafe name"):
            output.create_json(name, {"a": 1})
    for container in ("names-out", "names-other"):
        assert not list(blob_areas.service.get_container_client(container).list_blobs())


# -- 1: only video names ----------------------------------------------------------------------------


def test_only_video_names_are_taken_and_the_rest_refused_once(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path)
    inbox = tmp_path / "inbox"
    make_video(inbox / "ok.MP4", frames=2, width=32, height=24)
    (inbox / "innocent.m3u8").write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    (inbox / "notes.txt").write_text("notes")
    (inbox / "clip").write_bytes((inbox / "ok.MP4").read_bytes())
    assert watcher.tick() == {"done": 1, "quarantined": 3}
    assert watcher.input.downloads == ["ok.MP4"]  # type: ignore[attr-defined]
    work = tmp_path / "work"
    records = states(work)
    for name in ("innocent.m3u8", "notes.txt", "clip"):
        record = records[name]
        assert record["step"] == "quarantined" and "\n" not in record["reason"]
        assert all(suffix in record["reason"] for suffix in VIDEO_SUFFIXES)
        error = quarantine_record(work, record["key"])
        assert error["input"] == name and error["reason"] == record["reason"]
        assert sorted(p.name for p in (work / "quarantine" / record["key"]).iterdir()) == ["error.json"]  # not downloaded
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["ok.MP4", "ok.MP4.report.json"]

    assert watcher.tick() == {"done": 1, "quarantined": 3}  # never tried again
    assert watcher.input.downloads == ["ok.MP4"]  # type: ignore[attr-defined]
    assert states(work) == records


def test_delete_inputs_never_deletes_what_was_refused_unread(tmp_path: Path) -> None:
    """A refused name is never downloaded, so quarantine holds no copy: the input is the only one."""
    watcher = local_watcher(tmp_path, "delete_inputs=true")
    (tmp_path / "inbox" / "notes.txt").write_text("notes")
    (tmp_path / "inbox" / "clip.3gp").write_bytes(b"a video of a type the watcher does not take")
    assert watcher.tick() == {"quarantined": 2}
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["clip.3gp", "notes.txt"]


# -- 2: no symbolic links ------------------------------------------------------------------------------


def test_local_areas_never_follow_symbolic_links(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    outside = tmp_path / "outside"
    outside.mkdir()
    make_video(outside / "x.mp4", frames=2, width=32, height=24)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "link.mp4").symlink_to(secret)
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    (inbox / "real").mkdir()
    (inbox / "real" / "deeper.mp4").symlink_to(outside / "x.mp4")
    watcher = local_watcher(tmp_path)
    assert watcher.input.list() == []
    assert watcher.tick() == {}
    for path in files_under(tmp_path / "outbox", tmp_path / "work", tmp_path / "scratch"):
        assert b"TOPSECRET" not in path.read_bytes() and path.read_bytes() != (outside / "x.mp4").read_bytes()

    area = LocalArea("input", str(inbox))
    for name in ("link.mp4", "linkdir/x.mp4", "real/deeper.mp4"):
        with pytest.raises(StorageError, match="symbolic link"):
            area.download(name, tmp_path / "copy.mp4")
        assert area.version(name) is None
    with pytest.raises(StorageError, match="symbolic link"):
        area.read_json("link.mp4")
    assert not (tmp_path / "copy.mp4").exists()

    # Writing through a linked folder would put files outside the area.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "outbox" / "dir").symlink_to(elsewhere, target_is_directory=True)
    output = LocalArea("output", str(tmp_path / "outbox"))
    with pytest.raises(StorageError, match="symbolic link"):
        output.upload("dir/x.mp4", secret)
    with pytest.raises(StorageError, match="symbolic link"):
        output.create_json("dir/x.json", {"a": 1})
    assert list(elsewhere.iterdir()) == []


# -- 4: names that can never be delivered ----------------------------------------------------------


class NamesOnly:
    """An input area listing names no local folder here could hold (parts over 255 bytes)."""

    label = "input"

    def __init__(self, names: list[str]) -> None:
        self.entries = [Entry(name, "etag-1", 10, 1) for name in names]

    def list(self, prefix: str = "") -> list[Entry]:
        return self.entries

    def check(self, name: str) -> None:
        check_name(name, self.label)

    def version(self, name: str) -> Entry | None:
        return next((e for e in self.entries if e.name == name), None)

    def download(self, name: str, dest: Path) -> None:
        raise AssertionError(f"{name!r} must not be downloaded")


def test_undeliverable_names_are_quarantined_under_a_safe_key(tmp_path: Path) -> None:
    long_output = "/".join(["d" * 200] * 5) + "/c.mov"  # fits as an input, not with .mp4.report.json added
    names = ["bell\x07.mp4", "p" * 300 + ".mp4", "d/" * 520 + "x.mp4", "a\\b.mp4", long_output, "nl\nname.mkv"]
    watcher = local_watcher(tmp_path)
    watcher.input = NamesOnly(names)  # type: ignore[assignment]
    assert watcher.tick() == {"quarantined": len(names)}  # no error: the tick exits 0
    work = tmp_path / "work"
    records = states(work)
    assert sorted(records) == sorted(names)
    for name, record in records.items():
        assert record["key"] == job_name(name, "etag-1") and len(record["key"]) < 100
        assert record["step"] == "quarantined" and record["reason"].startswith("unusable name") and "\n" not in record["reason"]
        assert quarantine_record(work, record["key"])["input"] == name
    assert "over 1024 bytes" in records[long_output]["reason"]
    assert watcher.tick() == {"quarantined": len(names)}
    assert states(work) == records


def test_job_name_is_total() -> None:
    names = ["bell\x07.mp4", "nl\nname.mp4", "", "bad\udcff.mp4", "x" * 5000, "a\\b.mp4", "a/b.mp4"]
    keys = {job_name(name, "1") for name in names}
    assert len(keys) == len(names)
    for key in keys:
        assert key.isascii() and "/" not in key and "\\" not in key and not key.startswith(".") and len(key) < 100


# -- 5: collisions ------------------------------------------------------------------------------------


def test_two_inputs_never_share_an_output(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path)
    inbox = tmp_path / "inbox"
    make_video(inbox / "x.mov", frames=2, width=32, height=24)
    make_video(inbox / "x.mov.mp4", frames=3, width=32, height=24)
    assert watcher.tick() == {"done": 1, "quarantined": 1}
    records = states(tmp_path / "work")
    assert records["x.mov"]["step"] == "done" and records["x.mov"]["output"] == "x.mov.mp4"
    assert (tmp_path / "outbox" / "x.mov.mp4").read_bytes() == (inbox / "x.mov").read_bytes()
    loser = records["x.mov.mp4"]
    assert loser["step"] == "quarantined" and "x.mov" in loser["reason"] and "already" in loser["reason"]
    delivered = [json.loads(p.read_text()) for p in (tmp_path / "work" / "delivered").glob("*.json")]
    assert [(d["output"], d["input"], d["etag"]) for d in delivered] == [("x.mov.mp4", "x.mov", records["x.mov"]["etag"])]
    assert watcher.tick() == {"done": 1, "quarantined": 1}
    assert (tmp_path / "outbox" / "x.mov.mp4").read_bytes() == (inbox / "x.mov").read_bytes()


# -- 5 and 7: a quarantined video ----------------------------------------------------------------------


def test_a_quarantined_video_is_kept_under_a_fixed_name_and_nothing_stays_local(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path, runner=QuickRunner(exit_code=3))
    (tmp_path / "inbox" / "sub").mkdir()
    make_video(tmp_path / "inbox" / "sub" / "clip.mkv", frames=2, width=32, height=24)
    assert watcher.tick() == {"quarantined": 1}
    key = states(tmp_path / "work")["sub/clip.mkv"]["key"]
    kept = tmp_path / "work" / "quarantine" / key
    assert sorted(p.name for p in kept.iterdir()) == ["error.json", "input.mkv"]
    assert (kept / "input.mkv").read_bytes() == (tmp_path / "inbox" / "sub" / "clip.mkv").read_bytes()
    assert quarantine_record(tmp_path / "work", key)["exit_code"] == 3
    assert list(files_under(tmp_path / "scratch")) == []  # the copy and the job's staging went


# -- 6: an older upload never replaces a newer result -----------------------------------------------


def _v1_finished_its_job(tmp_path: Path, watcher: Watcher) -> tuple[Entry, str]:
    """clip.mp4, version 1 (uploaded long ago), whose job has just finished on this host."""
    inbox = tmp_path / "inbox"
    make_video(inbox / "clip.mp4", frames=2, width=32, height=24)
    os.utime(inbox / "clip.mp4", ns=(10**18, 10**18))
    v1 = watcher.input.list()[0]
    key1 = record_at(tmp_path / "work", v1, "finished", owner="here:1")
    (tmp_path / "scratch" / key1).mkdir(parents=True)
    (tmp_path / "scratch" / key1 / "output.mp4").write_bytes(b"v1's result")
    return v1, key1


def test_an_older_version_finishing_late_is_superseded(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path)
    inbox, work, outbox = tmp_path / "inbox", tmp_path / "work", tmp_path / "outbox"
    v1, key1 = _v1_finished_its_job(tmp_path, watcher)
    # v1's job was still running when v2 came and was delivered.
    make_video(inbox / "clip.mp4", frames=3, width=32, height=24)
    assert watcher.advance(watcher.input.list()[0]) == "done"
    v2_result = (outbox / "clip.mp4").read_bytes()

    assert watcher.advance(v1) == "superseded"
    assert (outbox / "clip.mp4").read_bytes() == v2_result
    record = json.loads((work / "state" / f"{key1}.json").read_text())
    assert record["step"] == "superseded" and record["reason"]
    assert not (tmp_path / "scratch" / key1).exists()


def test_an_older_version_is_superseded_after_the_newer_one_was_delivered_and_deleted(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path, "delete_inputs=true")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    v1, _ = _v1_finished_its_job(tmp_path, watcher)
    make_video(inbox / "clip.mp4", frames=3, width=32, height=24)
    assert watcher.tick() == {"done": 1}
    assert not (inbox / "clip.mp4").exists()  # the input is gone: only the delivery record knows v2
    assert watcher.advance(v1) == "superseded"
    assert (outbox / "clip.mp4").read_bytes() != b"v1's result"


@pytest.mark.azurite
def test_an_older_blob_finishing_late_is_superseded(blob_areas: Any, tmp_path: Path) -> None:
    areas = {"input": blob_areas("input", "late-input"), "output": blob_areas("output", "late-output"),
             "work": blob_areas("work", "late-work")}
    watcher = Watcher(watch_cfg(tmp_path), areas, QuickRunner(), owner="here:1")
    inputs = blob_areas.service.get_container_client("late-input")
    inputs.upload_blob("clip.mp4", b"version 1")
    v1 = areas["input"].list()[0]
    key1 = job_name(v1.name, v1.etag)
    record = {"input": v1.name, "etag": v1.etag, "key": key1, "step": "finished", "job": None, "owner": "here:1",
              "lease_until": 0, "attempts": 1, "history": []}
    assert areas["work"].create_json(f"state/{key1}.json", record)
    (tmp_path / "scratch" / key1).mkdir(parents=True)
    (tmp_path / "scratch" / key1 / "output.mp4").write_bytes(b"v1's result")
    version2 = make_video(tmp_path / "v2.mp4", frames=2, width=32, height=24).read_bytes()  # probed before its job
    inputs.upload_blob("clip.mp4", version2, overwrite=True)
    assert watcher.tick() == {"done": 1}

    assert watcher.advance(v1) == "superseded"
    outputs = blob_areas.service.get_container_client("late-output")
    assert outputs.download_blob("clip.mp4").readall() == version2
    assert areas["work"].read_json(f"state/{key1}.json")[0]["step"] == "superseded"


# -- 7: records whose input went ------------------------------------------------------------------------


def test_records_of_deleted_inputs_are_swept(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path, "sweep_after_s=60")
    inbox, work = tmp_path / "inbox", tmp_path / "work"
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        make_video(inbox / name, frames=2, width=32, height=24)
    entries = {e.name: e for e in watcher.input.list()}
    key_b = record_at(work, entries["b.mp4"], "staged")  # its watcher died
    (tmp_path / "scratch" / key_b).mkdir(parents=True)
    (tmp_path / "scratch" / key_b / "input.mp4").write_bytes(b"copy")
    key_c = record_at(work, entries["c.mp4"], "submitted", owner="alive:2", lease_until=time.time() + 3600)
    (inbox / "b.mp4").unlink()
    (inbox / "c.mp4").unlink()
    assert watcher.tick() == {"done": 2}  # a and d; b and c are too recent to sweep
    key_a = states(work)["a.mp4"]["key"]
    (inbox / "a.mp4").unlink()
    assert watcher.tick() == {"done": 1}

    hours_ago = time.time() - 7200
    for record in (work / "state").glob("*.json"):
        os.utime(record, (hours_ago, hours_ago))
    assert watcher.tick() == {"done": 1, "swept": 1, "abandoned": 1}
    left = states(work)
    assert sorted(left) == ["b.mp4", "c.mp4", "d.mp4"]  # a's final record is gone, d's input is still there
    assert left["b.mp4"]["step"] == "abandoned" and not (tmp_path / "scratch" / key_b).exists()
    assert left["c.mp4"]["step"] == "submitted" and left["c.mp4"]["key"] == key_c  # held by a live watcher
    assert (work / "logs" / key_a / "job.log").exists()  # logs stay
    for record in (work / "state").glob("*.json"):
        os.utime(record, (hours_ago, hours_ago))
    assert watcher.tick() == {"done": 1, "swept": 1}  # b's record, final now, goes too
    assert sorted(states(work)) == ["c.mp4", "d.mp4"]


def test_an_input_the_listing_missed_is_not_swept(tmp_path: Path) -> None:
    """A listing that skipped a folder (unreadable for a moment) is no proof the input is gone:
    sweeping its 'done' record would score and deliver it again."""
    watcher = local_watcher(tmp_path, "sweep_after_s=60")
    (tmp_path / "inbox" / "sub").mkdir()
    make_video(tmp_path / "inbox" / "sub" / "a.mp4", frames=2, width=32, height=24)
    assert watcher.tick() == {"done": 1}
    hours_ago = time.time() - 7200
    for record in (tmp_path / "work" / "state").glob("*.json"):
        os.utime(record, (hours_ago, hours_ago))
    assert list(watcher._sweep([])) == []  # as a tick whose listing missed sub/ would call it
    assert states(tmp_path / "work")["sub/a.mp4"]["step"] == "done"


# -- 8: a record's local_input is not trusted ---------------------------------------------------------


@pytest.mark.parametrize("step", ["staged", "finished"])
def test_a_record_pointing_at_another_file_uploads_nothing_of_it(tmp_path: Path, step: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    watcher = local_watcher(tmp_path, "max_attempts=1")
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2, width=32, height=24)
    entry = watcher.input.list()[0]
    key = record_at(tmp_path / "work", entry, step, local_input=str(secret), owner="here:1")
    if step == "finished":
        (tmp_path / "scratch" / key).mkdir(parents=True)
        shutil.copyfile(tmp_path / "inbox" / "clip.mp4", tmp_path / "scratch" / key / "output.mp4")
    assert watcher.tick() == {"done" if step == "finished" else "quarantined": 1}
    written = list(files_under(tmp_path / "outbox", tmp_path / "work"))
    assert written and all(b"TOPSECRET" not in p.read_bytes() for p in written)


# -- 9: the report a user gets ------------------------------------------------------------------------


def test_public_report_keeps_the_figures_and_drops_the_internals() -> None:
    full = {
        "mpistyle_version": "1", "run_id": "20240101-abc", "frames": 4, "frames_reused": 0, "ranks": 1,
        "input": {"path": "/scratch/k/input.mp4", "codec": "h264", "width": 64, "height": 48, "frames": 4},
        "output": {"path": "/scratch/k/output.mp4", "codec": "libx264", "width": 64, "height": 48, "bytes": 900},
        "model": {"_target_": "mpistyle.model.loading.load_transformer_net", "checkpoint": "/home/me/models/candy.pth"},
        "damage": {"policy": "conceal", "damaged": 0}, "fps": {"end_to_end": 3.0},
        "per_rank": [{"rank": 0, "host": "node-7", "device": "cpu", "frames": 4, "seconds_total": 1.0}],
        "staging": "/scratch/k/staging/run", "preview": "/scratch/k/output.mp4.preview.png",
    }
    public = public_report(full)
    text = json.dumps(public)
    assert "/scratch" not in text and "/home" not in text and "node-7" not in text and "20240101-abc" not in text
    assert public["frames"] == 4 and public["fps"] == {"end_to_end": 3.0} and public["damage"]["damaged"] == 0
    assert public["input"]["name"] == "input.mp4" and public["output"]["codec"] == "libx264"
    assert public["model"]["checkpoint"] == "candy.pth" and public["preview"] == "output.mp4.preview.png"
    assert public["per_rank"] == [{"rank": 0, "device": "cpu", "frames": 4, "seconds_total": 1.0}]


def test_the_delivered_report_has_no_paths_or_host_names(tmp_path: Path) -> None:
    overrides = local_overrides(tmp_path)
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2, width=32, height=24)
    done = run_watch(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr
    delivered = (tmp_path / "outbox" / "clip.mp4.report.json").read_text()
    assert str(tmp_path) not in delivered and socket.gethostname() not in delivered
    public = json.loads(delivered)
    assert public["frames"] == 2 and public["input"]["name"] == "clip.mp4" and public["per_rank"][0]["frames"] == 2
    key = states(tmp_path / "work")["clip.mp4"]["key"]
    full = json.loads((tmp_path / "work" / "logs" / key / "report.json").read_text())
    assert full["per_rank"][0]["host"] == socket.gethostname() and str(tmp_path / "scratch") in full["input"]["path"]
