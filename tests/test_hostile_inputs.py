"""Hostile inputs (issue 12): files that make FFmpeg read other files, that never end, that claim
one frame size and carry another, that hold a huge number of frames in a few bytes; and valid files
that used to fail only after every frame was scored. Each is made here, small. The generic checks
(input untouched, nothing half-written left) run on the same kinds in tests/test_bad_inputs.py."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import pytest

from mpistyle import formats
from mpistyle import video as video_module
from mpistyle.config import LimitsConfig
from mpistyle.errors import ConfigError, InputError
from mpistyle.pipeline import run
from mpistyle.sample import make_video
from mpistyle.video import Limits, probe

from conftest import make_cfg, run_mpistyle
from media import (
    audio_packets,
    concat_list,
    decode_all,
    hls_playlist,
    image_sequence,
    joined,
    mjpeg_pcm_avi,
    repeated_frames,
    sdp_session,
    stream_summary,
    with_extra_streams,
)


def _job(source: Path, output: Path, *overrides: str) -> list[str]:
    # Quoted: Hydra's grammar gives '%' and spaces a meaning.
    return [f"input='{source}'", f"output='{output}'", "report.preview_frames=0", *overrides]


# 1. Indirect formats: only single-file demuxers, only the file protocol.

INDIRECT: dict[str, tuple[Callable[[Path], Path], str]] = {
    "HLS playlist naming a video outside its folder": (hls_playlist, "the hls format"),
    "ffconcat list": (concat_list, "the concat format"),
    "SDP session (would wait for RTP forever)": (sdp_session, "the sdp format"),
    "image2 pattern opening the files beside it": (image_sequence, "still image (image2)"),
}


@pytest.mark.parametrize("name", list(INDIRECT))
def test_indirect_formats_are_refused_before_they_read_anything(name: str, tmp_path: Path) -> None:
    make, words = INDIRECT[name]
    output = tmp_path / "out.mp4"
    log_level = av.logging.get_level()
    with pytest.raises(InputError) as raised:
        run(make_cfg(_job(make(tmp_path), output)))
    message = str(raised.value)
    assert words in message and "\n" not in message, message
    if "still image" not in message:
        assert formats.describe() in message  # says what would be accepted
    assert not output.exists()
    assert av.logging.get_level() == log_level  # FFmpeg's log was read for the message, then put back


def test_an_hls_playlist_is_exit_3_and_one_line_from_the_real_program(tmp_path: Path) -> None:
    playlist = hls_playlist(tmp_path)
    done = run_mpistyle(*_job(playlist, tmp_path / "out.mp4"), cwd=tmp_path, timeout=120)
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "hls format" in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_a_fifo_fails_fast_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    done = run_mpistyle(*_job(fifo, tmp_path / "out.mp4"), cwd=tmp_path, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_a_device_is_not_a_video() -> None:
    with pytest.raises(InputError, match="not a regular file"):
        probe("/dev/zero")


def test_a_name_that_looks_like_a_protocol_is_still_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given to FFmpeg as it is, "clip:1.mp4" names the protocol "clip".
    monkeypatch.chdir(tmp_path)
    make_video(tmp_path / "clip:1.mp4", frames=4, audio=0)
    assert probe("clip:1.mp4").frames == 4


@pytest.mark.parametrize("name", ["in.ts", "in.flv", "in.avi"])
def test_single_file_containers_are_still_read(name: str, tmp_path: Path) -> None:
    source = make_video(tmp_path / name, frames=4)
    report = run(make_cfg(_job(source, tmp_path / "out.mp4")))
    assert report["frames"] == len(decode_all(tmp_path / "out.mp4")[0]) == 4
    assert [a["action"] for a in report["output"]["audio"]] == ["copied"]


# 2. Limits, checked while the input is probed.


def test_a_frame_count_bomb_stops_being_indexed_at_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = repeated_frames(tmp_path / "bomb.mkv", 100_000)  # 1.6 MB, 66 min at 25 fps
    read = _count_packets(monkeypatch)
    with pytest.raises(InputError, match=r"more than limits\.frames=1000 video frames"):
        probe(str(bomb), Limits(frames=1000))
    assert len(read) == 1001  # not 100 000
    read.clear()
    with pytest.raises(InputError, match=r"longer than limits\.duration_s=10"):
        probe(str(bomb), Limits(duration_s=10))
    assert len(read) < 300  # 10 s at 25 fps


def _count_packets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    read: list[int] = []
    indexed = video_module._video_packets

    def counting(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.Packet]:
        for packet in indexed(container, stream):
            read.append(packet.pts)
            yield packet

    monkeypatch.setattr(video_module, "_video_packets", counting)
    return read


def test_the_default_limits_refuse_the_issues_frame_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    """300k 8K frames at 30 fps, each repeating the last (28 bytes): 10 MB on disk, under the
    default frame, duration and pixel-rate limits, and days of work. The packets are made up
    (encoding 8K frames is too slow for a test); the index sees only their timestamps and flags."""
    from fractions import Fraction
    from types import SimpleNamespace

    packets = (SimpleNamespace(size=28, is_discard=False, pts=i, is_keyframe=i == 0) for i in range(300_000))
    read = []

    def fake(container: object, stream: object) -> Iterator[SimpleNamespace]:
        for packet in packets:
            read.append(packet.pts)
            yield packet

    monkeypatch.setattr(video_module, "_video_packets", fake)
    defaults = Limits(**vars(LimitsConfig()))
    assert 300_000 < defaults.frames and 300_000 / 30 < defaults.duration_s  # the other limits let it pass
    with pytest.raises(InputError, match=r"more than limits\.total_pixels="):
        video_module._index(None, None, Fraction(1, 30), defaults, 7680 * 4320, "bomb.mkv")
    assert len(read) < 100_000  # stopped at the limit, not after indexing it all


def test_the_default_limits_accept_an_ordinary_video(tmp_path: Path) -> None:
    source = make_video(tmp_path / "in.mp4", frames=12)
    defaults = LimitsConfig()
    info = probe(str(source), Limits(**vars(defaults)))
    assert info.frames == 12
    assert defaults.pixels == 7680 * 4320 and defaults.duration_s == 3 * 3600


@pytest.mark.parametrize(
    "override",
    ["limits.frames=0", "limits.bytes=-1", "limits.duration_s=nan", "limits.pixel_rate=0", "limits.total_pixels=0"],
)
def test_limits_must_be_positive(override: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run(make_cfg(_job(tmp_path / "in.mp4", tmp_path / "out.mp4", override)))


# 3. Frames bigger (or smaller) than the stream's header says.


def _growing(folder: Path) -> Path:
    small = make_video(folder / "small.ts", frames=6, gop=6, audio=0)
    big = make_video(folder / "big.ts", frames=6, gop=6, width=96, height=96, audio=0)
    return joined([small, big], folder / "growing.ts")


def test_a_frame_size_that_grows_mid_stream_is_a_bad_input(tmp_path: Path) -> None:
    source = _growing(tmp_path)
    assert (probe(str(source)).width, probe(str(source)).height) == (64, 48)  # what the header says
    with pytest.raises(InputError) as raised:
        run(make_cfg(_job(source, tmp_path / "out.mp4")))
    assert "frame 6 is 96x96, the stream's header says 64x48" in str(raised.value)
    done = run_mpistyle(*_job(source, tmp_path / "cli.mp4"), cwd=tmp_path, timeout=240)
    assert done.returncode == 3, done.stderr  # not 1, an internal error
    assert "changes its frame size" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "cli.mp4").exists()


# 4. Audio the output's container cannot hold as it is, and the streams mpistyle drops.


def test_pcm_audio_is_converted_for_mp4_and_copied_into_matroska(tmp_path: Path) -> None:
    source = mjpeg_pcm_avi(tmp_path / "camera.avi", frames=6)  # 0.5 s of sound
    report = run(make_cfg(_job(source, tmp_path / "out.mp4")))
    assert report["output"]["audio"] == [{"stream": 1, "codec": "pcm_s16le", "action": "converted to aac"}]
    assert stream_summary(tmp_path / "out.mp4") == [("video", "h264"), ("audio", "aac")]
    with av.open(str(tmp_path / "out.mp4")) as container:
        sound = list(container.decode(container.streams.audio[0]))
    assert sum(frame.samples for frame in sound) / 48000 == pytest.approx(0.5, abs=0.03)
    report = run(make_cfg(_job(source, tmp_path / "out.mkv")))
    assert report["output"]["audio"] == [{"stream": 1, "codec": "pcm_s16le", "action": "copied"}]
    assert audio_packets(tmp_path / "out.mkv") == audio_packets(source)


def test_audio_that_can_be_neither_copied_nor_converted_is_refused_before_scoring(tmp_path: Path) -> None:
    source = mjpeg_pcm_avi(tmp_path / "nine.avi", channels=9)  # AAC has no 9-channel layout
    with pytest.raises(InputError) as raised:
        run(make_cfg(_job(source, tmp_path / "out.mp4")))
    assert "audio stream #1 (pcm_s16le)" in str(raised.value) and "output=NAME.mkv" in str(raised.value)
    assert not (tmp_path / ".mpistyle-staging").exists()  # nothing was scored


@pytest.mark.parametrize(
    ("suffix", "dropped"),
    [
        (".mov", ["data #2 (TimeCodeHandler)"]),
        (".ts", ["data #2 (klv)"]),
        (".mkv", ["attachment #2 (notes.txt)", "video #3 (png, attached picture)"]),
    ],
)
def test_timecode_data_and_attachments_are_dropped_and_named(suffix: str, dropped: list[str], tmp_path: Path) -> None:
    source = with_extra_streams(make_video(tmp_path / "plain.mkv", frames=4), tmp_path / f"extra{suffix}")
    info = probe(str(source))
    assert list(info.dropped_streams) == dropped and info.audio_streams == (1,)


def test_an_output_container_mpistyle_cannot_read_back_is_refused_before_scoring(tmp_path: Path) -> None:
    """The preview is decoded from the output through the same allow-list: a nut output used to
    be written whole and then fail as a bad input (exit 3), which a watcher quarantines."""
    source = make_video(tmp_path / "in.mp4", frames=2)
    with pytest.raises(ConfigError, match=r"video\.format=nut: mpistyle writes only containers it reads back"):
        run(make_cfg(_job(source, tmp_path / "out.nut", "video.format=nut")))
    assert not (tmp_path / "out.nut").exists()
