from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mpistyle.encode import EncodeSettings
from mpistyle.errors import InputError
from mpistyle.mux import reorder_depth, stream_dts
from mpistyle.video import Decoded, VideoInfo, decode_segment, probe

from media import decode_all, open_gop_ts


@pytest.mark.parametrize("name", ["in.mp4", "in.mkv", "in.mov"])
def test_probe_reads_the_index_without_decoding(video: Callable[..., Path], name: str) -> None:
    path = video(name, frames=30, gop=6, width=64, height=48, fps=12)
    info = probe(str(path))
    assert info.frames == 30
    assert (info.width, info.height) == (64, 48)
    assert len(info.keyframe_pts) == 5 and _gop_sizes(info) == [6] * 5
    assert info.average_rate == 12
    assert info.audio_streams and info.duration_s == pytest.approx(2.5, abs=0.01)


@pytest.mark.parametrize("seconds", [0, 0.5, 1.0, 10.0])
@pytest.mark.parametrize("bframes", [0, 2])
@pytest.mark.parametrize("name", ["in.mp4", "in.mkv", "in.mov"])
def test_segments_decode_to_exactly_the_straight_decode(
    video: Callable[..., Path], seconds: float, bframes: int, name: str
) -> None:
    path = video(name, frames=31, gop=5, bframes=bframes)
    info = probe(str(path))
    segments = info.segments(seconds)
    # Each decoded on its own, last first: as the ranks that take them do, in whatever order.
    pieces = {segment.number: list(decode_segment(info, segment)) for segment in reversed(segments)}
    frames = [frame for number in sorted(pieces) for frame in pieces[number]]
    straight, _ = decode_all(path)
    assert len(frames) == len(straight) == 31
    assert all(np.array_equal(a, b) for a, b in zip(frames, straight))
    assert segments[0].start == 0 and segments[-1].stop == 31
    assert all(a.stop == b.start for a, b in itertools.pairwise(segments))


@pytest.mark.parametrize("seconds", [0, 0.5, 1.0])
def test_open_gop_mpeg_ts_segments_decode_to_the_straight_decode(tmp_path: Path, seconds: float) -> None:
    # MPEG-TS seeks land after the keyframe, and the next packet may be a B-frame shown before
    # it: each segment must still decode from far enough back to get every one of its frames.
    path = open_gop_ts(tmp_path / "open.ts")
    info = probe(str(path))
    straight, _ = decode_all(path)
    segments = info.segments(seconds)
    pieces = [frame for segment in segments for frame in decode_segment(info, segment)]
    assert len(pieces) == len(straight) == info.frames
    assert all(np.array_equal(a, b) for a, b in zip(pieces, straight))


@pytest.mark.parametrize("bframes", [0, 2])
def test_one_keyframe_is_cut_on_the_timeline_with_the_extra_decoding_bounded(
    video: Callable[..., Path], bframes: int
) -> None:
    path = video("one.mkv", frames=120, fps=12, gop=1000, bframes=bframes, audio=0)  # 10 s, one keyframe
    info = probe(str(path))
    assert len(info.keyframe_pts) == 1
    segments = info.segments(1.0)
    assert len(segments) >= 5 and segments[0].start == 0 and segments[-1].stop == 120
    assert all(a.stop == b.start for a, b in itertools.pairwise(segments))
    assert all(segment.frames >= 12 for segment in segments)  # at least segment_seconds each
    assert all(segment.stop <= 8 * segment.frames for segment in segments)  # decoded per scored <= 8
    straight, _ = decode_all(path)
    decoded = Decoded()
    pieces = [frame for segment in segments for frame in decode_segment(info, segment, decoded=decoded)]
    assert all(np.array_equal(a, b) for a, b in zip(pieces, straight, strict=True))
    assert decoded.frames == sum(segment.stop for segment in segments)  # each from frame 0


def test_variable_frame_rate_with_one_keyframe_is_cut_by_time(video: Callable[..., Path]) -> None:
    pts = [i * 2 for i in range(30)] + [60 + i * 6 for i in range(30)]  # 12 fps, then 4 fps (1/24 s ticks)
    path = video("vfr.mkv", frames=len(pts), pts=pts, time_base=Fraction(1, 24), gop=1000, audio=0)
    info = probe(str(path))
    segments = info.segments(1.0)
    assert len(info.keyframe_pts) == 1 and len(segments) >= 4
    # At least a second each by the clock, whatever the frame count (all but the last).
    assert all(info.frame_pts[s.stop] - info.frame_pts[s.start] >= 24 for s in segments[:-1])
    straight, _ = decode_all(path)
    pieces = [frame for segment in segments for frame in decode_segment(info, segment)]
    assert all(np.array_equal(a, b) for a, b in zip(pieces, straight, strict=True))


def test_every_gop_decodes_alone_from_an_avi_with_b_frames(video: Callable[..., Path]) -> None:
    # AVI seeks by decode time and landed one packet past a keyframe: the 1-frame GOP was lost.
    # (No B-frames in the input: FFmpeg cannot restore their display order from AVI.)
    path = video("cuts.avi", frames=20, keyframes=[0, 6, 7], bframes=0, audio=0)
    info = probe(str(path))
    assert _gop_sizes(info) == [6, 1, 13]
    pieces = [frame for gop in info.segments(0) for frame in decode_segment(info, gop)]
    straight, _ = decode_all(path)
    assert len(pieces) == 20 and all(np.array_equal(a, b) for a, b in zip(pieces, straight))


def _gop_sizes(info: VideoInfo) -> list[int]:
    return [gop.frames for gop in info.segments(0)]


def _dts(decode_order: list[int]) -> list[int]:
    return stream_dts(sorted(decode_order), reorder_depth(decode_order))


def test_stream_dts_joins_segments_whose_encoders_chose_other_delays() -> None:
    # A 1-frame segment (dts = pts, no room for a delay) between two with B-frames: what the
    # encoders wrote cannot be concatenated; the rebuilt clock must still be valid.
    decode_order = [0, 4, 2, 1, 3, 5, 6, 9, 7, 8]  # a B-pyramid (depth 2), a P frame, one B-frame
    dts = _dts(decode_order)
    assert all(a < b for a, b in itertools.pairwise(dts))  # strictly increasing
    assert all(d <= p for d, p in zip(dts, decode_order))  # never decoded after it is shown
    assert dts == [-2, -1, 0, 1, 2, 3, 4, 5, 6, 7]  # depth 2: the clock starts two frame steps early


def test_stream_dts_is_valid_for_any_reordering_of_bounded_depth() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        shown = sorted(rng.choice(10_000, size=int(rng.integers(1, 60)), replace=False).tolist())
        decode_order = _reordered(shown, rng)
        dts = _dts(decode_order)
        assert all(a < b for a, b in itertools.pairwise(dts))
        assert all(d <= p for d, p in zip(dts, decode_order))
        depth = reorder_depth(decode_order)
        assert dts[depth:] == shown[: len(shown) - depth]  # no more delay than the stream needs
        # The join takes the stream's depth as the largest of its segments' (cut between pts).
        cuts = sorted(rng.choice(len(shown), size=min(2, len(shown) - 1), replace=False).tolist()) if len(shown) > 1 else []
        bounds = [0, *(c + 1 for c in cuts), len(shown)]
        pieces = [_reordered(shown[a:b], rng) for a, b in itertools.pairwise(bounds)]
        whole = [pts for piece in pieces for pts in piece]
        assert reorder_depth(whole) == max(reorder_depth(piece) for piece in pieces)


def _reordered(shown: list[int], rng: np.random.Generator) -> list[int]:
    decode_order = list(shown)
    for _ in range(len(shown) // 3):  # B-frame style swaps: a frame decoded a few places early
        i = int(rng.integers(0, len(shown)))
        j = min(len(shown) - 1, i + int(rng.integers(1, 4)))
        decode_order[i], decode_order[j] = decode_order[j], decode_order[i]
    return decode_order


def test_variable_frame_rate_timestamps_are_indexed(video: Callable[..., Path]) -> None:
    pts = [0, 1, 2, 4, 7, 8, 12, 13, 20, 21, 22, 30]
    path = video("vfr.mkv", frames=len(pts), pts=pts, time_base=Fraction(1, 24), gop=4)
    info = probe(str(path))
    _, times = decode_all(path)
    assert [float(p * info.time_base) for p in info.frame_pts] == pytest.approx(times)


def test_stream_starting_between_keyframes(video: Callable[..., Path], tmp_path: Path) -> None:
    # A cut that starts mid-GOP: the packets before the first keyframe cannot be decoded, and
    # a straight decode skips them; the index must agree with it.
    source = video("whole.mkv", frames=20, gop=8, bframes=0, audio=0)
    cut = tmp_path / "cut.mkv"
    with av.open(str(source)) as src, av.open(str(cut), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        packets = [p for p in src.demux(src.streams.video[0]) if p.size]
        for packet in packets[3:]:
            packet.stream = stream
            dst.mux(packet)
    straight, _ = decode_all(cut)
    info = probe(str(cut))
    assert info.frames == len(straight) == 12
    pieces = [frame for segment in info.segments(0) for frame in decode_segment(info, segment)]
    assert all(np.array_equal(a, b) for a, b in zip(pieces, straight, strict=True))


def test_missing_input() -> None:
    with pytest.raises(InputError, match="not found"):
        probe("/nonexistent/video.mp4")


def test_directory_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        probe(str(tmp_path))


def test_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        probe(str(path))


def test_random_bytes_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a video"):
        probe(str(path))


# Audio-only files, still images and the other bad inputs: tests/test_bad_inputs.py.


# Encodes 12 textured 80x60 frames with the job's encoder settings and prints the packets' digest.
_ENCODE_ONCE = """
import hashlib, sys
from fractions import Fraction
import numpy as np
from mpistyle.encode import EncodeSettings, SegmentEncoder
from mpistyle.video import VideoInfo
frames = np.random.default_rng(7).integers(0, 256, (12, 60, 80, 3), dtype=np.uint8)
frames = ((frames.astype(np.uint16) + np.roll(frames, 1, axis=0)) // 2).astype(np.uint8)  # some motion to track
info = VideoInfo(path="x.mp4", container="mp4", codec="h264", width=80, height=60, time_base=Fraction(1, 24),
                 average_rate=Fraction(24), sample_aspect_ratio=None, frame_pts=tuple(range(12)), keyframe_pts=(0,),
                 audio_streams=())
encoder = SegmentEncoder(info, EncodeSettings(), 0, "mp4")
packets = encoder.encode(frames) + encoder.finish()
print(hashlib.sha256(b"".join(p.data for p in packets)).hexdigest())
"""


def test_x264_output_does_not_depend_on_what_memory_held_before() -> None:
    # x264's AVX-512 macroblock-tree code reads memory it never wrote when a row is not a
    # multiple of 8 macroblocks (80 px is 5): on CPUs with AVX-512 the same frames encoded to
    # other bits from run to run, and ranks disagreed. glibc's MALLOC_PERTURB_ fills fresh
    # memory with a byte of our choosing, which makes any such read change the output. (On a
    # CPU without AVX-512 that code never runs, and this passes with or without the fix.)
    digests = set()
    for fill in ("0", "77", "165"):
        env = {**os.environ, "MALLOC_PERTURB_": fill}
        done = subprocess.run([sys.executable, "-c", _ENCODE_ONCE], capture_output=True, text=True, env=env, check=True)
        digests.add(done.stdout.strip())
    assert len(digests) == 1


def test_encode_settings_take_the_video_node_with_its_interpolations_resolved() -> None:
    from omegaconf import OmegaConf

    from mpistyle.config import VideoConfig

    node = OmegaConf.structured(VideoConfig)
    node.options = {"tune": "${preset}"}
    settings = EncodeSettings.of(node)
    assert settings.options == {"tune": "medium"} and settings.crf == 18  # segment_seconds is not the encoder's


@pytest.mark.parametrize(
    "args, words",
    [
        (["odd.mp4", "--size", "321x181"], "must be even for H.264, got 321x181 (try 322x182)"),
        (["clip.avi"], "must end in .mp4, .mkv, .mov"),
    ],
)
def test_the_sample_tool_refuses_what_it_cannot_write_in_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mpistyle.sample", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
