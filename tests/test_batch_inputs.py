"""Reading a batch's inputs (``inputs=`` a folder, a list file or a JSONL file): every video with
its output and allowed settings, a bad line failing alone, an impossible batch refused whole."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpistyle.batch_inputs import read_inputs
from mpistyle.errors import ConfigError


def _files(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded here")
    return folder


def test_a_folder_gives_its_videos_by_name_and_leaves_other_files(tmp_path: Path) -> None:
    videos = _files(tmp_path / "videos", "b.mov", "a.mp4", "notes.txt", "c.MKV", "d.json")
    (videos / "sub").mkdir()
    _files(videos / "sub", "e.mp4")
    items = read_inputs(str(videos), str(tmp_path / "styled"))
    assert [item.input.name for item in items if item.input] == ["a.mp4", "b.mov", "c.MKV"]
    assert [item.output for item in items] == [tmp_path / "styled" / n for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert all(item.error is None and not item.settings for item in items)


@pytest.mark.parametrize(
    "make, output_dir, message",
    [
        (lambda d: _files(d / "v", "a.mp4"), None, "add output_dir=FOLDER"),
        (lambda d: _files(d / "v", "a.mp4"), "v", "is the inputs folder"),
        (lambda d: d / "missing", "out", "no such folder or file"),
        (lambda d: _files(d / "v", "notes.txt"), "out", "names no video"),
        (lambda d: _files(d / "v", "a.mp4", "a.mov"), "out", "2 inputs would write"),
    ],
    ids=["no-output-dir", "output-is-input-folder", "missing", "no-videos", "two-write-one-output"],
)
def test_a_batch_that_cannot_be_done_is_refused_before_work(tmp_path: Path, make, output_dir, message) -> None:  # type: ignore[no-untyped-def]
    source = make(tmp_path)
    with pytest.raises(ConfigError, match=message):
        read_inputs(str(source), str(tmp_path / output_dir) if output_dir else None)


def test_a_list_file_takes_paths_from_its_folder_and_refuses_bad_lines_alone(tmp_path: Path) -> None:
    _files(tmp_path / "in", "a.mp4", "b.mov")
    listing = tmp_path / "in" / "list.txt"
    listing.write_text(f"# tonight's uploads\na.mp4\n\n{tmp_path / 'in' / 'b.mov'}\nmissing.mp4\na.mp4\n")
    items = read_inputs(str(listing), str(tmp_path / "out"))
    assert [(item.source, item.error) for item in items] == [
        ("list.txt:2", None),
        ("list.txt:4", None),
        ("list.txt:5", f"input not found: {tmp_path / 'in' / 'missing.mp4'}"),
        ("list.txt:6", "repeats list.txt:2"),
    ]
    assert items[1].output == tmp_path / "out" / "b.mp4"


def test_a_jsonl_file_gives_each_video_its_output_and_allowed_settings(tmp_path: Path) -> None:
    _files(tmp_path, "a.mp4", "b.mov", "painting.jpg")
    lines = [
        {"input": "a.mp4", "output": "styled/a-5.mp4", "model.style": 5},
        {"input": "a.mp4", "output": "styled/a-mix.mp4", "model.blend": {"3": 0.5, "19": 0.5}},
        {"input": "b.mov", "model.style_image": "painting.jpg", "model.style_strength": 0.6},
        {"input": "b.mov", "output": "/etc/passwd.mp4", "hydra.run.dir": "/"},
        {"input": "b.mov", "output": "x.mp4", "model._target_": "os.system"},
        {"output": "x.mp4"},
        ["a.mp4"],
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    items = read_inputs(str(jobs), str(tmp_path / "out"))
    first, mix, painting, hydra, target, no_input, array, broken = items
    assert (first.output, first.settings) == (tmp_path / "styled" / "a-5.mp4", {"model.style": 5})
    assert mix.settings == {"model.blend": {"3": 0.5, "19": 0.5}}
    assert painting.output == tmp_path / "out" / "b.mp4"
    assert painting.settings["model.style_image"] == str(tmp_path / "painting.jpg")  # from the file's folder
    assert hydra.error is not None and "sets hydra.run.dir, which a batch line may not" in hydra.error
    assert target.error is not None and "model._target_" in target.error
    assert no_input.error == 'names no "input" (a path)'
    assert array.error == "not a JSON object but list"
    assert broken.error is not None and broken.error.startswith("not a JSON object (")
    assert all(item.error is None for item in (first, mix, painting))


def test_a_jsonl_line_without_an_output_needs_output_dir(tmp_path: Path) -> None:
    _files(tmp_path, "a.mp4", "b.mp4")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"input": "a.mp4", "output": "a-out.mp4"}\n{"input": "b.mp4"}\n')
    items = read_inputs(str(jobs), None)
    assert items[0].error is None
    assert items[1].error == 'names no "output", and the job has no output_dir='



def test_a_jsonl_setting_takes_one_kind_of_value_and_never_code_or_an_interpolation(tmp_path: Path) -> None:
    _files(tmp_path, "a.mp4")
    lines = [
        {"input": "a.mp4", "output": "1.mp4", "model.blend": {"_target_": "os.system", "_args_": ["touch pwned"]}},
        {"input": "a.mp4", "output": "2.mp4", "video.preset": "${oc.env:AZURE_STORAGE_KEY}"},
        {"input": "a.mp4", "output": "3.mp4", "model.style": "5"},
        {"input": "a.mp4", "output": "${oc.env:HOME}.mp4"},
        {"input": "a.mp4", "output": "5.mp4", "model.blend": {"3": 0.5, "19": 0.5}},
        {"input": "a.mp4", "output": "6.mp4", "temporal.alpha": float("nan")},  # json writes NaN, and reads it
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    nested, interpolated, text, path, fine, nan = read_inputs(str(jobs), None)
    assert nan.error == "temporal.alpha must be a number, got NaN"
    assert nested.error is not None and nested.error.startswith("model.blend must be style numbers to weights")
    assert interpolated.error is not None and interpolated.error.startswith("video.preset must be a preset's name")
    assert text.error == 'model.style must be a whole number, got "5"'
    assert path.error == "a path holds '${': rename it"
    assert fine.error is None


def test_no_output_may_be_another_videos_input(tmp_path: Path) -> None:
    _files(tmp_path, "a.mp4", "b.mp4")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"input": "a.mp4", "output": "sub/../b.mp4"}\n{"input": "b.mp4", "output": "b-out.mp4"}\n')
    with pytest.raises(ConfigError, match=r"jobs\.jsonl:1 would write over jobs\.jsonl:2.s input"):
        read_inputs(str(jobs), None)
