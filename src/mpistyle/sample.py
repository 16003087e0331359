"""Make sample videos with sound, from nothing: for the demo, for the tests, and for a user who
wants to smoke-test a cluster without copying media onto it.

    mpistyle-sample sample.mp4 --seconds 5 --size 640x360

The picture is a procedural landscape (sky, sun, hills scrolling at different speeds, a moving
ball) so that every frame differs and a style has edges and colours to work on; the sound is one
sine tone per audio track. Encoded with PyAV: H.264 (yuv420p) and AAC by default.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import cast

import av
import numpy as np

AUDIO_RATE = 48000


def landscape(index: int, width: int, height: int, fps: float = 24.0) -> np.ndarray:
    """Frame ``index`` of the scene as RGB uint8 ``(height, width, 3)``."""
    t = index / fps
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    v, u = y / max(1, height - 1), x / max(1, width - 1)
    sky = np.stack([0.35 + 0.4 * v, 0.55 + 0.3 * v, 0.95 - 0.2 * v], axis=-1)
    image = sky
    sun_u, sun_v = 0.75 - 0.02 * t, 0.25 + 0.01 * t
    sun = ((u - sun_u) * width) ** 2 + ((v - sun_v) * height) ** 2 < (0.09 * height) ** 2
    image[sun] = (1.0, 0.85, 0.3)
    for depth, (speed, base, colour) in enumerate(
        [(0.03, 0.55, (0.35, 0.45, 0.6)), (0.08, 0.68, (0.2, 0.5, 0.25)), (0.16, 0.8, (0.1, 0.35, 0.12))]
    ):
        phase = (u + speed * t) * (3 + 2 * depth) * np.pi
        ridge = base + 0.06 * np.sin(phase) + 0.03 * np.sin(2.7 * phase + depth)
        image[v > ridge] = colour
    ball_u = 0.1 + 0.8 * ((0.15 * t) % 1.0)
    ball_v = 0.6 - 0.25 * abs(np.sin(2.5 * t))
    ball = ((u - ball_u) * width) ** 2 + ((v - ball_v) * height) ** 2 < (0.05 * height) ** 2
    image[ball] = (0.9, 0.15, 0.2)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def make_video(
    path: Path,
    frames: int = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 12,
    gop: int = 6,
    audio: int = 1,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    bframes: int = 2,
    rotation: float = 0.0,
    keyframes: Sequence[int] | None = None,
    processes: int = 1,
    preset: str = "veryfast",
    start: int = 0,
) -> Path:
    """Write a real video of ``frames`` frames with ``audio`` AAC tracks of sine tones.

    ``gop`` is the keyframe interval (H.264), or ``keyframes`` lists the frames that are (as
    scene cuts place them). ``pts`` (with ``time_base``) gives each frame its own timestamp, for
    variable frame rate. ``processes`` draw the frames side by side (a long 1080p clip).
    ``start``: the scene's first frame drawn (clips of one scene, each its own contents).
    """
    with av.open(str(path), "w") as out:
        video = cast(av.VideoStream, out.add_stream(codec, rate=fps))
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            interval = str(frames + 1) if keyframes is not None else str(gop)
            video.options = {
                "g": interval,
                "keyint_min": interval,
                "forced-idr": "1",
                "sc_threshold": "0",
                "bf": str(bframes),
                "preset": preset,
            }
        if rotation:
            video.set_display_rotation(rotation)  # as a phone held upright records it
        if time_base is not None:
            video.time_base = time_base
            video.codec_context.time_base = time_base
        tones = []
        for track in range(audio):
            stream = out.add_stream("aac", rate=AUDIO_RATE)
            stream.layout = "mono"
            tones.append((stream, 220.0 * (track + 1)))
        for index, picture in enumerate(_pictures(start, frames, width, height, fps, processes)):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if keyframes is not None and index in keyframes:
                frame.pict_type = av.video.frame.PictureType.I
            if pts is not None:
                frame.pts = pts[index]
                frame.time_base = time_base
            for packet in video.encode(frame.reformat(format=pix_fmt)):
                out.mux(packet)
        # Encoding None flushes the frames the encoder still holds (B-frames, lookahead).
        for packet in video.encode(None):
            out.mux(packet)
        seconds = float(pts[-1] * time_base) + 1 / fps if pts is not None and time_base else frames / fps
        for stream, hertz in tones:
            _write_tone(out, stream, hertz, seconds)
    return path


def _pictures(start: int, frames: int, width: int, height: int, fps: float, processes: int) -> Iterator[np.ndarray]:
    """The scene's frames in order, drawn by ``processes`` worker processes when more than one."""
    draw = partial(landscape, width=width, height=height, fps=fps)
    if processes <= 1:
        yield from map(draw, range(start, start + frames))
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap(draw, range(start, start + frames), chunksize=4)


def _write_tone(out: av.container.OutputContainer, stream: av.AudioStream, hertz: float, seconds: float) -> None:
    samples = int(seconds * AUDIO_RATE)
    wave = (0.3 * np.sin(2 * np.pi * hertz * np.arange(samples) / AUDIO_RATE)).astype(np.float32)
    for start in range(0, samples, 1024):
        chunk = np.ascontiguousarray(wave[start : start + 1024][None, :])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x360, got '{text}'") from None
    if width < 2 or height < 2:
        raise argparse.ArgumentTypeError("width and height must be at least 2")
    if width % 2 or height % 2:
        # H.264 in 4:2:0 halves the colour planes: both sides must be even.
        raise argparse.ArgumentTypeError(
            f"width and height must be even for H.264, got {width}x{height} (try {width + width % 2}x{height + height % 2})"
        )
    return width, height


_SUFFIXES = (".mp4", ".mkv", ".mov")


def _output(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in _SUFFIXES:
        raise argparse.ArgumentTypeError(f"the output must end in {', '.join(_SUFFIXES)}, got '{text}'")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpistyle-sample", description="Write a sample video with sound.")
    parser.add_argument("output", type=_output, help="file to write (.mp4, .mkv or .mov)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length (default 5)")
    parser.add_argument("--size", type=_size, default=(640, 360), help="WIDTHxHEIGHT (default 640x360)")
    parser.add_argument("--fps", type=int, default=24, help="frames per second (default 24)")
    parser.add_argument("--audio-tracks", type=int, default=1, help="number of audio tracks (default 1)")
    args = parser.parse_args(argv)
    width, height = args.size
    frames = max(1, round(args.seconds * args.fps))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Half-second GOPs: even a short clip splits evenly over a few ranks (splits follow keyframes).
    make_video(args.output, frames, width, height, args.fps, gop=max(1, args.fps // 2), audio=args.audio_tracks)
    print(f"wrote {args.output}: {frames} frames, {width}x{height} at {args.fps} fps, {args.audio_tracks} audio track(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
