"""Read videos back for assertions: decoded frames with their times, raw audio packets."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame (RGB) and its presentation time in seconds, from a straight decode."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * frame.time_base))
    return frames, times


def audio_packets(path: Path) -> list[list[bytes]]:
    """The raw packets of each audio stream, to compare copies byte for byte."""
    with av.open(str(path)) as container:
        streams = list(container.streams.audio)
        tracks: list[list[bytes]] = [[] for _ in streams]
        position = {stream.index: i for i, stream in enumerate(streams)}
        for packet in container.demux(streams):
            if packet.size:
                tracks[position[packet.stream_index]].append(bytes(packet))
    return tracks


def stream_summary(path: Path) -> list[tuple[str, str]]:
    with av.open(str(path)) as container:
        return [(s.type, s.codec_context.name if s.codec_context else "") for s in container.streams]


def keyframe_flags(path: Path) -> list[bool]:
    """Whether each video packet is a keyframe, in presentation order."""
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(container.streams.video[0]) if p.size]
    return [key for _, key in sorted(packets)]
