"""Per-video settings (issue 18, point 2): a settings file ``<video name>.json`` beside a video
sets that video's style, model or style image, checked against the watcher's allow-list before
anything is downloaded or started; a refused one quarantines the video with the reason. Real
jobs where a style must reach the output (the local runner, Azurite); the refusals drive a
:class:`Watcher` in this process with a runner that does a job's work in a blink."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module

from azurite import Azurite
from mpistyle.errors import ConfigError
from mpistyle.sample import make_video
from mpistyle.watch import config as watch_config
from mpistyle.watch import sidecar
from mpistyle.watch.runners import JobSpec
from test_watch import blob_setup, local_overrides, run_watch, starts, states
from test_watch_names import QuickRunner, local_watcher, quarantine_record

from media import png_picture

watch_config.register()


class RecordingRunner(QuickRunner):
    """A quick runner that keeps each job's overrides, and the style image's bytes it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[dict[str, str]] = []
        self.pictures: list[bytes] = []

    def start(self, job: JobSpec) -> str:
        overrides = dict(o.split("=", 1) for o in job.overrides)
        self.jobs.append(overrides)
        if "model.style_image" in overrides:
            self.pictures.append(Path(overrides["model.style_image"]).read_bytes())
        return super().start(job)


def video(tmp_path: Path, name: str = "clip.mp4", settings: Any = None, **kwargs: Any) -> Path:
    """A tiny video in the inbox, with its settings file when ``settings`` is given (an object
    as JSON, bytes or text as they are)."""
    (tmp_path / "inbox" / name).parent.mkdir(parents=True, exist_ok=True)
    path = make_video(tmp_path / "inbox" / name, **{"frames": 2, "width": 32, "height": 24, "audio": 0, **kwargs})
    if settings is not None:
        text = settings if isinstance(settings, str | bytes) else json.dumps(settings)
        path.with_name(path.name + ".json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- the settings file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "is_one"),
    [("clip.mp4.json", True), ("a/b/clip.MOV.json", True), ("clip.json", False), ("notes.json", False),
     ("clip.mp4.JSON", False), ("clip.mp4.json.json", False), ("clip.mp4", False)],
)
def test_a_settings_file_is_a_video_name_with_json_added(name: str, is_one: bool) -> None:
    assert sidecar.is_sidecar(name) is is_one


def test_settings_become_overrides_and_batch_lines_the_job_reads_as_values() -> None:
    raw = json.dumps({"model.style": 5, "model.blend": {"3": 0.5, "19": 0.25}}).encode()
    settings = sidecar.parse(raw, "clip.mp4.json", sidecar.ALLOWED, ["multistyle"], "styles/")
    assert settings.overrides(None) == ["model.style=5", "model.blend='3:0.5,19:0.25'"]
    assert settings.line(None) == {"model.style": 5, "model.blend": "3:0.5,19:0.25"}
    image = sidecar.parse(b'{"model": "arbitrary", "model.style_image": "a/monet.jpg"}', "x.mp4.json", sidecar.ALLOWED,
                          ["arbitrary"], "styles/")
    assert image.choice() == ["model=arbitrary"] and image.style_image == "styles/a/monet.jpg"
    assert image.overrides(Path("/w/k/style.jpg")) == ["model.style_image=/w/k/style.jpg"]


def test_the_allow_list_takes_only_per_video_settings() -> None:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        for override, message in (
            ("settings_allowed=[model.style,output]", "settings_allowed names output, which is no per-video setting"),
            ("settings_allowed=[hydra.run.dir]", "settings_allowed names hydra.run.dir"),
            ("settings_models=[nonesuch]", "settings_models names nonesuch, which is no model config"),
            ("style_images=../up/", "style_images must be a folder of the input area"),
            ("style_images=styles", "style_images must be a folder of the input area"),
        ):
            with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
                watch_config.check(compose("watch", overrides=[override]))
        watch_config.check(compose("watch", overrides=["settings_allowed=[model.style,temporal.alpha]", "style_images=''"]))


# -- a style reaches the video, through a real job ------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 2])  # a job of its own, or a line of a batch's JSONL file
def test_a_videos_settings_style_its_output_and_are_no_input_of_their_own(tmp_path: Path, max_batch: int) -> None:
    video(tmp_path, "styled.mp4", {"model.style": 5}, frames=3, width=64, height=48)
    video(tmp_path, "plain.mp4", frames=3, width=64, height=48)
    done = run_watch(tmp_path, *local_overrides(tmp_path, f"max_batch={max_batch}"))
    assert done.returncode == 0 and "tick: 2 done" in done.stderr, done.stderr
    records = states(tmp_path / "work")
    assert sorted(records) == ["plain.mp4", "styled.mp4"]  # the settings file is not an input
    assert records["styled.mp4"]["settings"] == {"model.style": 5} and records["plain.mp4"]["settings"] is None
    assert len({r["job"] for r in records.values()}) == (1 if max_batch == 2 else 2)
    outbox = tmp_path / "outbox"
    assert json.loads((outbox / "styled.mp4.report.json").read_text())["model"]["style"] == 5
    assert json.loads((outbox / "plain.mp4.report.json").read_text())["model"]["style"] == 19
    assert not (outbox / "styled.mp4.json").exists() and not (outbox / "styled.mp4.json.mp4").exists()


# -- refusals: quarantined with the reason, before the video is downloaded or any job starts -----

REFUSED = {
    "a Hydra key": ({"hydra.run.dir": "/tmp/elsewhere"}, "sets hydra.run.dir, which a settings file may not set"),
    "the output": ({"output": "/etc/cron.d/x", "model.style": 5}, "sets output, which a settings file may not set"),
    "a limit": ({"limits.bytes": 10**15}, "sets limits.bytes, which a settings file may not set"),
    "a setting not allowed here": ({"temporal.alpha": 0.5}, "sets temporal.alpha, which a settings file may not set"),
    "a style that is no number": ({"model.style": "five"}, 'model.style must be a whole number, got "five"'),
    "a style out of range": ({"model.style": 99}, "unknown style 99: the built-in styles are 0 to 25"),
    "a bad blend": ({"model.blend": "3:0.5,x"}, "model.blend must map style numbers to weights"),
    "a blend of an unknown style": ({"model.blend": {"3": 0.5, "40": 0.5}}, "unknown style 40"),
    "a model not allowed": ({"model": "torchscript"}, "sets model to \"torchscript\": it may choose arbitrary, multistyle"),
    "a setting the model has not": ({"model.style_image": "monet.png"}, "sets what the jobs here cannot take"),
    "a style image outside its folder": ({"model": "arbitrary", "model.style_image": "../clip.mp4"},
                                         "model.style_image must name a picture in the input area's styles/ folder"),
    "an absolute style image": ({"model": "arbitrary", "model.style_image": "/etc/passwd"}, "must name a picture"),
    "an array": ([{"model.style": 5}], "holds a JSON list, not an object of settings"),
    "not JSON": ('{"model.style": 5', "is not JSON"),
    "NaN": ('{"model.style": NaN}', "holds NaN, which is not a number any setting takes"),
    "a key set twice": ('{"model.style": 5, "model.style": 6}', "sets model.style twice"),
    "not UTF-8": (b'{"model.style": "\xff"}', "is not UTF-8 text"),
    "too large": (" " * sidecar.MAX_BYTES + "{}", f"is {sidecar.MAX_BYTES + 2} bytes; a settings file is at most"),
}


@pytest.mark.parametrize(("settings", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_settings_quarantine_the_video_unread_and_start_nothing(tmp_path: Path, settings: Any, reason: str) -> None:
    video(tmp_path, "clip.mp4", settings)
    runner = RecordingRunner()
    watcher = local_watcher(tmp_path, runner=runner)
    assert watcher.tick() == {"quarantined": 1}
    assert runner.jobs == [] and "clip.mp4" not in watcher.input.downloads  # type: ignore[attr-defined]
    record = states(tmp_path / "work")["clip.mp4"]
    error = quarantine_record(tmp_path / "work", record["key"])
    assert reason in error["reason"] and "clip.mp4.json" in error["reason"], error["reason"]
    assert "upload it again" in error["what_to_do"] and error["exit_code"] == 3
    # The settings file as it was read is kept beside the reason (unless too large to read).
    kept = sorted(p.name for p in (tmp_path / "work" / "quarantine" / record["key"]).iterdir())
    assert kept == (["error.json"] if "at most" in reason else ["error.json", "settings.json"])
    assert watcher.tick() == {"quarantined": 1} and runner.jobs == []  # once, and never tried again


# -- style images -----------------------------------------------------------------------------------


def test_a_style_image_comes_from_the_styles_folder_and_goes_with_the_video(tmp_path: Path) -> None:
    (tmp_path / "inbox" / "styles").mkdir(parents=True)
    (tmp_path / "inbox" / "styles" / "monet.png").write_bytes(png_picture())
    video(tmp_path, "clip.mp4", {"model": "arbitrary", "model.style_image": "monet.png"})
    video(tmp_path, "other.mp4", {"model.style": 3})
    runner = RecordingRunner()
    watcher = local_watcher(tmp_path, "max_batch=4", runner=runner)
    assert watcher.tick() == {"done": 2}
    records = states(tmp_path / "work")
    assert sorted(records) == ["clip.mp4", "other.mp4"]  # no record for the picture: not an input
    assert records["clip.mp4"]["settings"] == {"model": "arbitrary", "model.style_image": "styles/monet.png"}
    # Its own model: a job of its own (a batch has one model), with a copy of the picture, never
    # a path the settings named; the other one alone too (a batch of one is a job of its own).
    [clip] = [job for job in runner.jobs if "model" in job]
    assert clip["model"] == "arbitrary" and Path(clip["model.style_image"]).parent == Path(clip["input"]).parent
    assert runner.pictures == [png_picture()]
    assert [job.get("model.style") for job in runner.jobs if "model" not in job] == ["3"]
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]  # copies cleaned with the rest


@pytest.mark.parametrize(
    ("picture", "extra", "reason"),
    [
        (None, (), "its settings name the style image styles/monet.png, which is not in the input area"),
        (b"not a picture", (), "its style image: styles/monet.png is not a picture FFmpeg can read"),
        (png_picture(), ("job_overrides=['limits.pixels=200']",), "over limits.pixels=200"),  # 16 x 16 pixels
    ],
    ids=["missing", "not a picture", "over the pixel limit"],
)
def test_an_unusable_style_image_quarantines_the_video_before_any_job(
    tmp_path: Path, picture: bytes | None, extra: tuple[str, ...], reason: str
) -> None:
    (tmp_path / "inbox" / "styles").mkdir(parents=True)
    if picture is not None:
        (tmp_path / "inbox" / "styles" / "monet.png").write_bytes(picture)
    video(tmp_path, "clip.mp4", {"model": "arbitrary", "model.style_image": "monet.png"})
    runner = RecordingRunner()
    watcher = local_watcher(tmp_path, *extra, runner=runner)
    assert watcher.tick() == {"quarantined": 1} and runner.jobs == []
    assert "clip.mp4" not in watcher.input.downloads  # type: ignore[attr-defined]  # the picture is checked first
    error = quarantine_record(tmp_path / "work", states(tmp_path / "work")["clip.mp4"]["key"])
    assert reason in error["reason"], error["reason"]
    assert "styles/monet.png" in error["what_to_do"] and str(tmp_path) not in json.dumps(error)


# -- versions: a changed settings file is a new job -----------------------------------------------


def rewrite(path: Path, data: object) -> None:
    """Replace a file with other contents: another version (a local etag is its mtime and size)."""
    before = path.stat().st_mtime_ns
    path.write_text(json.dumps(data))
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1000, before + 1000))


def test_a_changed_or_removed_settings_file_is_a_new_version_of_the_video(tmp_path: Path) -> None:
    clip = video(tmp_path, "clip.mp4", {"model.style": 5})
    runner = RecordingRunner()
    watcher = local_watcher(tmp_path, runner=runner)
    assert watcher.tick() == {"done": 1}
    rewrite(clip.with_name("clip.mp4.json"), {"model.style": 7})
    assert watcher.tick() == {"done": 1}  # the new version; the old record is no longer listed
    clip.with_name("clip.mp4.json").unlink()
    assert watcher.tick() == {"done": 1}
    assert watcher.tick() == {"done": 1}  # and nothing again
    assert [job.get("model.style") for job in runner.jobs] == ["5", "7", None]
    records = [json.loads(p.read_text()) for p in (tmp_path / "work" / "state").glob("*.json")]
    assert len({r["key"] for r in records}) == 3 and all(r["step"] == "done" and starts(r) == 1 for r in records)


def test_a_settings_file_replaced_while_its_job_ran_delivers_only_the_new_version(tmp_path: Path) -> None:
    clip = video(tmp_path, "clip.mp4", {"model.style": 5})

    class ReplacingRunner(RecordingRunner):
        def start(self, job: JobSpec) -> str:
            handle = super().start(job)
            if len(self.jobs) == 1:  # the user changes their mind while the first job runs
                rewrite(clip.with_name("clip.mp4.json"), {"model.style": 7})
            return handle

    runner = ReplacingRunner()
    watcher = local_watcher(tmp_path, runner=runner)
    assert watcher.tick() == {"superseded": 1}
    assert not (tmp_path / "outbox" / "clip.mp4").exists()
    assert watcher.tick() == {"done": 1}
    assert [job["model.style"] for job in runner.jobs] == ["5", "7"]


def test_settings_wait_s_gives_a_late_settings_file_time_to_arrive(tmp_path: Path) -> None:
    clip = video(tmp_path, "clip.mp4")
    runner = RecordingRunner()
    watcher = local_watcher(tmp_path, "settings_wait_s=3600", runner=runner)
    assert watcher.tick() == {"waiting": 1} and not (tmp_path / "work" / "state").exists()  # not even claimed
    clip.with_name("clip.mp4.json").write_text(json.dumps({"model.style": 2}))
    old = video(tmp_path, "old.mp4")
    hour_ago = time.time_ns() - 3601 * 10**9
    os.utime(old, ns=(hour_ago, hour_ago))  # uploaded long ago, with no settings: taken as it is
    assert watcher.tick() == {"done": 2}
    assert sorted((job.get("model.style") or "") for job in runner.jobs) == ["", "2"]


def test_delete_inputs_deletes_the_settings_file_with_its_video(tmp_path: Path) -> None:
    video(tmp_path, "clip.mp4", {"model.style": 5})
    video(tmp_path, "bad.mp4", {"output": "x"})
    watcher = local_watcher(tmp_path, "delete_inputs=true")
    assert watcher.tick() == {"done": 1, "quarantined": 1}
    # The refused one was never downloaded: quarantine holds no copy, so it stays, with its settings.
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["bad.mp4", "bad.mp4.json"]


# -- on Azure Blob Storage --------------------------------------------------------------------------


@pytest.mark.azurite
def test_settings_files_on_blob_storage(azurite: Azurite, tmp_path: Path) -> None:
    env, overrides, service = blob_setup(azurite, "settings")
    inputs = service.get_container_client("settings-input")  # type: ignore[attr-defined]
    source = make_video(tmp_path / "clip.mp4", frames=3, width=64, height=48)
    inputs.upload_blob("clip.mp4", source.read_bytes())
    inputs.upload_blob("clip.mp4.json", json.dumps({"model.style": 5}))
    inputs.upload_blob("bad.mp4", source.read_bytes())
    inputs.upload_blob("bad.mp4.json", json.dumps({"hydra.run.dir": "/tmp/x"}))
    done = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert done.returncode == 0 and "1 done" in done.stderr and "1 quarantined" in done.stderr, done.stderr
    outputs = service.get_container_client("settings-output")  # type: ignore[attr-defined]
    assert sorted(b.name for b in outputs.list_blobs()) == ["clip.mp4", "clip.mp4.preview.png", "clip.mp4.report.json"]
    assert json.loads(outputs.download_blob("clip.mp4.report.json").readall())["model"]["style"] == 5
    work = service.get_container_client("settings-work")  # type: ignore[attr-defined]
    records = [json.loads(work.download_blob(b.name).readall()) for b in work.list_blobs(name_starts_with="state/")]
    assert sorted((r["input"], r["step"]) for r in records) == [("bad.mp4", "quarantined"), ("clip.mp4", "done")]
    bad = next(r for r in records if r["input"] == "bad.mp4")
    error = json.loads(work.download_blob(f"quarantine/{bad['key']}/error.json").readall())
    assert "bad.mp4.json sets hydra.run.dir, which a settings file may not set" in error["reason"]
    assert done.stderr.count("started as") == 1
