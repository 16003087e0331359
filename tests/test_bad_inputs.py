"""The bad and awkward input corpus: every case gets a correct output or a one-line error with
its documented exit code; the input is never modified and no incomplete output is left where a
finished one would be."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.model.transformer_net import TransformerNet
from mpistyle.pipeline import run
from mpistyle.sample import make_video

from conftest import make_cfg, run_mpistyle
from media import (
    concat_list,
    decode_all,
    hls_playlist,
    joined,
    mjpeg_pcm_avi,
    repeated_frames,
    stream_summary,
    with_extra_streams,
)


@dataclass
class Case:
    make: Callable[[Path], Path]  # builds the input in a folder, returns its path
    exit_code: int  # 0: a correct output is expected
    words: str = ""  # in the error message
    overrides: list[str] = field(default_factory=list)
    frames: int | None = None  # expected output frame count when it succeeds
    output: str = "out.mp4"


def _video(name: str, **kwargs: object) -> Callable[[Path], Path]:
    return lambda folder: make_video(folder / name, **kwargs)


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


def _truncated_mp4(folder: Path) -> Path:
    full = make_video(folder / "full.mp4", frames=12).read_bytes()
    (folder / "truncated.mp4").write_bytes(full[: len(full) // 2])
    return folder / "truncated.mp4"


def _truncated_mkv(folder: Path) -> Path:
    # Matroska streams: the part before the cut still plays, and is what the output holds.
    full = make_video(folder / "full.mkv", frames=24, audio=0).read_bytes()
    (folder / "truncated.mkv").write_bytes(full[: len(full) * 2 // 3])
    return folder / "truncated.mkv"


def _image(folder: Path) -> Path:
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 16, 16, "rgb24"
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    (folder / "photo.mp4").write_bytes(b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))
    return folder / "photo.mp4"


def _audio_only(folder: Path) -> Path:
    with av.open(str(folder / "tone.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        for packet in stream.encode(frame) + stream.encode(None):
            out.mux(packet)
    return folder / "tone.mp4"


def _unknown_codec(folder: Path) -> Path:
    data = make_video(folder / "a.mp4", frames=6).read_bytes().replace(b"avc1", b"zzz1")
    (folder / "unknown-codec.mp4").write_bytes(data)
    return folder / "unknown-codec.mp4"


def _corrupt_packets(folder: Path) -> Path:
    """Two packets in the middle overwritten with noise, the container left intact."""
    source = make_video(folder / "clean.mkv", frames=24, width=64, height=48, gop=8, bframes=0, audio=0)
    noise = np.random.default_rng(0)
    target = folder / "corrupt-packets.mkv"
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for index, packet in enumerate(p for p in src.demux(src.streams.video[0]) if p.size):
            if index in (10, 11):
                data = bytearray(bytes(packet))
                data[8:] = noise.integers(0, 256, len(data) - 8, dtype=np.uint8).tobytes()
                broken = av.Packet(bytes(data))
                broken.pts, broken.dts, broken.time_base = packet.pts, packet.dts, packet.time_base
                packet = broken
            packet.stream = stream
            dst.mux(packet)
    return target


def _subtitles(folder: Path) -> Path:
    """A video with an ASS subtitle stream beside it."""
    path = folder / "subtitled.mkv"
    make_video(folder / "plain.mkv", frames=6)
    with av.open(str(folder / "plain.mkv")) as src, av.open(str(path), "w") as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        dst.add_stream("ass")  # an empty subtitle track is still a stream to drop
        for packet in src.demux():
            if packet.size:
                packet.stream = streams[packet.stream_index]
                dst.mux(packet)
    return path


def _fifo(folder: Path) -> Path:
    """A named pipe with a video's name: opening it would wait for a writer forever."""
    os.mkfifo(folder / "pipe.mp4")
    return folder / "pipe.mp4"


def _growing(folder: Path) -> Path:
    """A 64x48 H.264 stream (so its header says) whose second GOP is 96x96."""
    small = make_video(folder / "small.ts", frames=6, gop=6, audio=0)
    big = make_video(folder / "big.ts", frames=6, gop=6, width=96, height=96, audio=0)
    return joined([small, big], folder / "growing.ts")


def _bomb(folder: Path) -> Path:
    return repeated_frames(folder / "bomb.mkv", 20_000)  # 320 kB


def _extra(suffix: str) -> Callable[[Path], Path]:
    return lambda folder: with_extra_streams(make_video(folder / "plain.mkv", frames=4), folder / f"extra{suffix}")


def _odd_path(folder: Path) -> Path:
    spaced = folder / "dir with spaces" / "ünïcødé clip (1).mp4"
    spaced.parent.mkdir()
    return make_video(spaced, frames=6)


def _checkpoint(kind: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        if kind == "corrupt":
            (folder / "model.pth").write_bytes(b"PK\x03\x04 not really a zip")
        else:
            state = TransformerNet().state_dict()
            state.pop("res3.conv1.conv2d.weight")
            import torch

            torch.save(state, folder / "model.pth")
        return make_video(folder / "in.mp4", frames=4)

    return make


def _wrong_checksum(folder: Path) -> Path:
    from mpistyle.model.loading import default_multistyle_weights

    data = bytearray(default_multistyle_weights().read_bytes())
    data[100] ^= 0x01
    (folder / "weights.onnx").write_bytes(bytes(data))
    return make_video(folder / "in.mp4", frames=4)


TRANSFORMER = ["model=transformer_net", "model.checkpoint=model.pth"]
CASES: dict[str, Case] = {
    "zero-byte file": Case(_bytes("empty.mp4", b""), 3, "input is empty"),
    "random bytes named .mp4": Case(_bytes("noise.mp4", np.random.default_rng(1).bytes(50_000)), 3, "not a video"),
    "truncated mp4 (index at the end)": Case(_truncated_mp4, 3, "not a video"),
    "truncated mkv (plays up to the cut)": Case(_truncated_mkv, 0),
    "an image": Case(_image, 3, "still image"),
    "audio only": Case(_audio_only, 3, "no video stream"),
    "a codec this build cannot decode": Case(_unknown_codec, 3, "cannot be decoded"),
    "one-frame video": Case(_video("one.mp4", frames=1), 0, frames=1),
    "odd dimensions": Case(_video("odd.mkv", frames=4, width=63, height=47, codec="libx264rgb", pix_fmt="rgb24"), 0, frames=4),
    "tiny dimensions": Case(_video("tiny.mp4", frames=4, width=2, height=2), 0, frames=4),
    "dimensions over the cap": Case(
        _video("big.mp4", frames=2, width=64, height=48), 3, "over limits.pixels=3000", ["limits.pixels=3000"]
    ),
    "HLS playlist naming a video outside its folder": Case(hls_playlist, 3, "the hls format"),
    "ffconcat list": Case(concat_list, 3, "the concat format"),
    "FIFO named like a video": Case(_fifo, 3, "not a regular file"),
    "frame size grows mid-stream": Case(_growing, 3, "changes its frame size"),
    "frame-count bomb": Case(_bomb, 3, "more than limits.frames=1000", ["limits.frames=1000"]),
    "over limits.bytes": Case(_video("in.mp4", frames=4), 3, "over limits.bytes=1000", ["limits.bytes=1000"]),
    "over limits.duration_s": Case(_bomb, 3, "longer than limits.duration_s=60", ["limits.duration_s=60"]),
    "over limits.total_pixels": Case(
        _video("in.mp4", frames=4), 3, "more than limits.total_pixels=10000", ["limits.total_pixels=10000"]
    ),
    "over limits.pixel_rate": Case(
        _video("in.mp4", frames=4), 3, "over limits.pixel_rate=10000", ["limits.pixel_rate=10000"]
    ),
    "AVI with MJPEG and PCM, into mp4": Case(lambda folder: mjpeg_pcm_avi(folder / "camera.avi"), 0, frames=6),
    "timecode track": Case(_extra(".mov"), 0, frames=4),
    "KLV data stream": Case(_extra(".ts"), 0, frames=4),
    "attachments and a cover picture": Case(_extra(".mkv"), 0, frames=4, output="out.mkv"),
    "variable frame rate": Case(
        _video("vfr.mkv", frames=6, pts=[0, 1, 3, 4, 9, 10], time_base=Fraction(1, 24), gop=3), 0, frames=6
    ),
    "rotation metadata": Case(_video("phone.mp4", frames=4, rotation=270), 0, frames=4),
    "10-bit": Case(_video("ten.mkv", frames=4, pix_fmt="yuv420p10le"), 0, frames=4),
    "several audio streams": Case(_video("multi.mkv", frames=4, audio=3), 0, frames=4, output="out.mkv"),
    "subtitles": Case(_subtitles, 0, frames=6),
    "corrupt packets, conceal (default)": Case(_corrupt_packets, 0, frames=24),
    "corrupt packets, fail": Case(_corrupt_packets, 3, "input is damaged", ["on_damage=fail"]),
    "non-ASCII and spaces in paths": Case(_odd_path, 0, frames=6, output="sortie ü/styled clip.mp4"),
    "output path equal to input": Case(_video("same.mp4", frames=2), 2, "output is the input", output="same.mp4"),
    "output directory missing": Case(_video("in.mp4", frames=2), 0, frames=2, output="new/deeper/out.mp4"),
    "output directory impossible": Case(_video("in.mp4", frames=2), 4, "output directory", output="in.mp4/out.mp4"),
    "corrupt checkpoint": Case(_checkpoint("corrupt"), 5, "cannot read checkpoint", TRANSFORMER),
    "mismatched checkpoint": Case(_checkpoint("mismatched"), 5, "does not fit", TRANSFORMER),
    "weights with the wrong checksum": Case(_wrong_checksum, 5, "SHA-256", ["model.weights=weights.onnx"]),
    "negative batch size": Case(_video("in.mp4", frames=2), 2, "batch_size", ["batch_size=-1"]),
    "unknown style": Case(_video("in.mp4", frames=2), 2, "unknown style 26", ["model.style=26"]),
}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_corpus(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    source = case.make(tmp_path)
    before = _digests(tmp_path)
    output = tmp_path / case.output
    monkeypatch.chdir(tmp_path)  # relative checkpoint and weights paths
    # Quoted, as a shell user quotes them: Hydra's grammar gives spaces and brackets a meaning.
    cfg = make_cfg([f"input='{source}'", f"output='{output}'", "report.preview_frames=1", *case.overrides])
    if case.exit_code:
        with pytest.raises(MpistyleError) as raised:
            run(cfg)
        assert raised.value.exit_code == case.exit_code, str(raised.value)
        assert case.words in str(raised.value) and "\n" not in str(raised.value)
        if output.is_file() and output != source:
            pytest.fail(f"a failed job left {output}")
    else:
        report = run(cfg)
        frames, _ = decode_all(output)
        assert len(frames) == (case.frames if case.frames is not None else report["frames"])
        assert report["frames"] == len(frames)
        assert stream_summary(output)[0] == ("video", "h264")
    # The input (and everything the case made) is untouched; nothing half-written is left.
    after = _digests(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if "partial" in k]


def test_corruption_is_reported_when_concealed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _corrupt_packets(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mpistyle.worker"):
        report = run(make_cfg([f"input={source}", f"output={tmp_path / 'out.mp4'}"]))
    damage = report["damage"]
    assert damage["policy"] == "conceal"
    assert damage["damaged"] + damage["concealed"] + damage["packet_errors"] >= 1
    # The log counts with the report's words, one meaning each.
    line = next(record.getMessage() for record in caplog.records if "damaged input" in record.getMessage())
    for word in ("damaged", "concealed"):
        assert f"{damage[word]} {word} frame(s)" in line
    assert f"{damage['packet_errors']} packet error(s)" in line


def test_subtitles_are_named_as_dropped(tmp_path: Path) -> None:
    report = run(make_cfg([f"input={_subtitles(tmp_path)}", f"output={tmp_path / 'out.mp4'}"]))
    assert report["input"]["dropped_streams"] == ["subtitle #2 (ssa)"]


def test_staging_disk_full(tmp_path: Path) -> None:
    """A file-size limit stands in for a full staging filesystem: exit 6, nothing left over."""
    source = make_video(tmp_path / "in.mp4", frames=8, width=160, height=90)
    limit = 100_000  # bytes: the input fits, one staged GOP (8 x 160x90x3) does not
    assert source.stat().st_size < limit
    args = [f"input={source}", f"output={tmp_path / 'out.mp4'}"]
    # MPI starts first: its shared-memory files must not hit the limit, only the job's writes.
    script = (
        "import resource, sys; from mpi4py import MPI; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        f"sys.argv[1:] = {args!r}; from mpistyle.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 6, done.stderr
    assert "staging filesystem is full" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_nonsense_overrides_at_the_command_line(tmp_path: Path) -> None:
    nonsense = [
        (["batch_size=lots"], "could not be converted"), (["model.stlye=3"], "stlye"), (["on_damage=ignore"], "on_damage")
    ]
    for args, words in nonsense:
        done = run_mpistyle(*args, f"input={tmp_path / 'x.mp4'}", f"output={tmp_path / 'y.mp4'}", cwd=tmp_path)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
