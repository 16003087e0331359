"""Small synthetic videos made with PyAV for the tests: moving shapes, a sine tone, any container."""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A frame that differs from its neighbours: gradients plus a moving square."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack(
        [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, (index * 7) % 256)], axis=-1
    ).astype(np.uint8)
    side = max(2, min(width, height) // 4)
    left = (index * 3) % max(1, width - side)
    top = (index * 2) % max(1, height - side)
    frame[top : top + side, left : left + side] = (255 - 10 * (index % 20), 40, 200)
    return frame


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
) -> Path:
    """Write a real H.264 (or other codec) video with ``audio`` AAC tracks of sine tones.

    ``pts`` (with ``time_base``) gives each frame its own timestamp, for variable frame rate.
    """
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"} if codec == "libx264" else {}
        if codec == "libx264":
            options.update({"bf": str(bframes), "preset": "ultrafast" if bframes == 0 else "veryfast"})
        video.options = options
        if time_base is not None:
            video.time_base = time_base
            video.codec_context.time_base = time_base
        tones = []
        for track in range(audio):
            stream = out.add_stream("aac", rate=48000)
            stream.layout = "mono"
            tones.append((stream, 220.0 * (track + 1)))
        duration = (float(pts[-1] * time_base) + 1 / fps) if pts is not None and time_base else frames / fps
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), format="rgb24")
            if pts is not None:
                frame.pts = pts[index]
                frame.time_base = time_base
            for packet in video.encode(frame.reformat(format=pix_fmt)):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        for stream, hertz in tones:
            samples = int(duration * 48000)
            t = np.arange(samples) / 48000
            wave = (0.3 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = wave[start : start + 1024][None, :]
                aframe = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                aframe.sample_rate = 48000
                aframe.pts = start
                for packet in stream.encode(aframe):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    return path


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame (RGB) and its presentation time in seconds, from a straight decode."""
    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * frame.time_base))
    return frames, times


def audio_packets(path: Path) -> list[list[bytes]]:
    """The raw audio packets of each audio stream, to compare copies byte for byte."""
    with av.open(str(path)) as container:
        streams = list(container.streams.audio)
        tracks: list[list[bytes]] = [[] for _ in streams]
        position = {stream.index: i for i, stream in enumerate(streams)}
        for packet in container.demux(streams):
            if packet.size:
                tracks[position[packet.stream_index]].append(bytes(packet))
    return tracks
