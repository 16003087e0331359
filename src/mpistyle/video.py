"""Everything PyAV: probe an input and index its packets, decode one share of frames, encode the
output and copy the input's audio into it packet for packet.

Frames are identified by their presentation timestamp (pts, in the video stream's time base).
The index is read from packets alone, so the root never decodes frames for the other ranks.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from .errors import ConfigError, InputError, OutputError

log = logging.getLogger(__name__)

# Demuxers that FFmpeg uses for single still images: not a video, whatever the extension says.
_STILL_IMAGE_FORMATS = ("image2", "_pipe")


@dataclass(frozen=True)
class VideoInfo:
    """What the root learns from the input's packets: enough to plan and to encode."""

    path: str
    container: str
    codec: str
    width: int
    height: int
    time_base: Fraction
    average_rate: Fraction | None
    sample_aspect_ratio: Fraction | None
    frame_pts: tuple[int, ...]  # every frame's pts, in presentation order
    keyframe_pts: tuple[int, ...]  # pts of the keyframes each GOP starts at, ascending
    audio_streams: tuple[int, ...]  # input stream indices copied into the output
    dropped_streams: tuple[str, ...] = field(default=())  # e.g. "subtitle #2 (mov_text)"
    rotation: float = 0.0  # display rotation (degrees counter-clockwise) players apply

    @property
    def frames(self) -> int:
        return len(self.frame_pts)

    @property
    def duration_s(self) -> float:
        if not self.frame_pts:
            return 0.0
        step = self.frame_pts[-1] - self.frame_pts[-2] if self.frames > 1 else 0
        return float((self.frame_pts[-1] + step - self.frame_pts[0]) * self.time_base)

    def gop_bounds(self) -> list[tuple[int, int]]:
        """Each GOP's frames ``[start, stop)``; frames shown before the first keyframe count
        with the first GOP."""
        starts = [0] + [bisect.bisect_left(self.frame_pts, pts) for pts in self.keyframe_pts[1:]]
        return list(itertools.pairwise([*starts, self.frames]))

    def gop_sizes(self) -> list[int]:
        return [stop - start for start, stop in self.gop_bounds()]

    @functools.cached_property
    def _bounds(self) -> list[tuple[int, int]]:
        return self.gop_bounds()

    def frame_range(self, gops: range) -> tuple[int, int]:
        """Frames ``[start, stop)`` of a run of whole GOPs (a segment); GOP bounds computed once."""
        return self._bounds[gops.start][0], self._bounds[gops.stop - 1][1]

    def segments(self, min_seconds: float) -> list[range]:
        """Consecutive GOPs grouped into segments of at least ``min_seconds`` (the last may be
        shorter): the units that are scored, staged and encoded independently.

        They depend on the input alone, never on the rank count, so the output is the same
        bits however many ranks share the work. 0 makes every GOP a segment.
        """
        starts = [0] + [bisect.bisect_left(self.frame_pts, pts) for pts in self.keyframe_pts[1:]]
        end_pts = self.frame_pts[0] + self.duration_s / self.time_base if self.frame_pts else 0
        segments: list[range] = []
        first = 0
        for gop in range(len(starts)):
            following = self.frame_pts[starts[gop + 1]] if gop + 1 < len(starts) else end_pts
            if float((following - self.frame_pts[starts[first]]) * self.time_base) >= min_seconds or gop + 1 == len(starts):
                segments.append(range(first, gop + 1))
                first = gop + 1
        return segments


@dataclass(frozen=True)
class Share:
    """A contiguous run of whole GOPs: frames ``[start, stop)`` in presentation order."""

    gops: range
    start: int
    stop: int
    seek_pts: int | None  # the first GOP's keyframe; None = decode from the start of the stream

    @property
    def frames(self) -> int:
        return self.stop - self.start


def shares_for(info: VideoInfo, gop_ranges: Sequence[range]) -> list[Share]:
    """Turn GOP ranges (from the partitioner) into frame ranges and the pts bounds a decoder uses."""
    starts = [start for start, _ in info.gop_bounds()] + [info.frames]
    return [
        Share(
            gops,
            starts[gops.start],
            starts[gops.stop],
            None if gops.start == 0 or not gops else info.keyframe_pts[gops.start],
        )
        for gops in gop_ranges
    ]


def _open_input(path: str) -> av.container.InputContainer:
    file = Path(path)
    if not file.exists():
        raise InputError(f"input not found: {path}")
    if file.is_dir():
        raise InputError(f"input is a directory, not a video file: {path}")
    if not os.access(file, os.R_OK):
        raise InputError(f"input is not readable (permission denied): {path}")
    if file.stat().st_size == 0:
        raise InputError(f"input is empty (0 bytes): {path}")
    try:
        # genpts: demuxers that leave some packets without a pts (AVI with B-frames) fill it in.
        return av.open(path, "r", options={"fflags": "+genpts"})
    except av.error.FFmpegError as err:
        raise InputError(f"input is not a video FFmpeg can read: {path} ({err.strerror})") from None


def probe(path: str) -> VideoInfo:
    """Read the input's packet index (no decoding) and check it is a video we can process."""
    with _open_input(path) as container:
        if any(tag in container.format.name for tag in _STILL_IMAGE_FORMATS):
            raise InputError(f"input is a still image ({container.format.name}), not a video: {path}")
        if not container.streams.video:
            raise InputError(f"input has no video stream (audio only?): {path}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.name:
            raise InputError(f"input's video codec cannot be decoded by this PyAV build: {path}")
        try:
            av.codec.Codec(ctx.name, "r")
        except av.error.FFmpegError:
            raise InputError(f"no decoder for the video codec '{ctx.name}' in this PyAV build: {path}") from None
        audio = tuple(s.index for s in container.streams.audio)
        dropped = tuple(
            f"{s.type} #{s.index} ({s.codec_context.name if s.codec_context else 'unknown'})"
            for s in container.streams
            if s.type not in ("video", "audio") or (s.type == "video" and s.index != stream.index)
        )
        frame_pts: list[int] = []
        keyframes: list[int] = []
        try:
            for packet in container.demux(stream):
                # The demuxer ends with an empty flush packet, and edit lists mark packets the
                # decoder must drop: neither is a frame of the video.
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.pts is None:
                    raise InputError(f"input has video packets without timestamps, which cannot be placed: {path}")
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
                elif not keyframes:
                    continue  # before the first keyframe nothing decodes: a straight decode skips it
                frame_pts.append(packet.pts)
        except av.error.FFmpegError as err:
            raise InputError(
                f"input is damaged: reading its packets failed at packet {len(frame_pts)} ({err.strerror}): {path}"
            ) from None
        if not frame_pts:
            raise InputError(f"input has a video stream but no frames: {path}")
        frame_pts.sort()
        if len(set(frame_pts)) != len(frame_pts):
            raise InputError(f"input has frames with duplicate timestamps, which cannot be kept in order: {path}")
        keyframes = sorted(set(keyframes))
        if stream.time_base is None:
            raise InputError(f"input's video stream has no time base: {path}")
        rotation = _display_rotation(container, stream)
        return VideoInfo(
            path=path,
            container=container.format.name,
            codec=ctx.name,
            width=ctx.width,
            height=ctx.height,
            time_base=Fraction(stream.time_base),
            average_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            sample_aspect_ratio=Fraction(ctx.sample_aspect_ratio) if ctx.sample_aspect_ratio else None,
            frame_pts=tuple(frame_pts),
            keyframe_pts=tuple(keyframes),
            audio_streams=audio,
            dropped_streams=dropped,
            rotation=rotation,
        )


def _display_rotation(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """The rotation phones record as a display matrix; PyAV shows it on decoded frames only, so
    decode the first one (frames are stored, and styled, unrotated)."""
    try:
        container.seek(0, stream=stream, backward=True)
        for frame in _frames(container, stream, "conceal", Damage(), ""):
            return float(frame.rotation or 0.0)
    except (av.error.FFmpegError, InputError):
        pass  # a damaged start is reported by the decode that needs it, with a better message
    return 0.0


@dataclass
class Damage:
    """What went wrong while decoding, under the ``conceal`` policy (counted, not fatal)."""

    damaged: int = 0  # frames the decoder flagged corrupt (it concealed the errors in them)
    concealed: int = 0  # frames that did not decode at all: the previous frame stands in
    packet_errors: int = 0  # packets the decoder rejected

    def add(self, other: Damage) -> None:
        self.damaged += other.damaged
        self.concealed += other.concealed
        self.packet_errors += other.packet_errors


def decode_share(info: VideoInfo, share: Share, policy: str = "fail", damage: Damage | None = None) -> Iterator[np.ndarray]:
    """Yield the share's frames as RGB ``(H, W, 3)`` uint8 arrays, in presentation order.

    Decoding starts at the share's first keyframe, so no frame outside the share is decoded
    (for closed GOPs) and each frame equals what a straight decode of the file gives.

    Damage (a corrupt frame, a rejected packet, a frame of the index that never decodes) raises
    :class:`InputError` under ``policy="fail"``. Under ``"conceal"`` it is counted in
    ``damage``: corrupt frames are kept as FFmpeg concealed them, and a frame that never decodes
    is replaced by the one before it, so the output keeps every timestamp.
    """
    if share.frames == 0:
        return
    damage = damage if damage is not None else Damage()
    expected = info.frame_pts[share.start : share.stop]
    first, last = expected[0], expected[-1]
    index = 0
    previous: np.ndarray | None = None
    with _open_input(info.path) as container:
        stream = container.streams.video[0]
        # Frame threads speed decoding up without changing any decoded pixel.
        stream.thread_type = "AUTO"
        if share.seek_pts is not None:
            _seek_before(container, stream, info, share.seek_pts)
        for frame in _frames(container, stream, policy, damage, info.path):
            if frame.pts is None or not first <= frame.pts <= last:
                continue  # another share's frame (the seek may land a GOP early)
            if frame.is_corrupt:
                if policy == "fail":
                    raise _damaged(info, share.start + index, "is corrupt")
                damage.damaged += 1
            picture = frame.to_ndarray(format="rgb24")
            while expected[index] < frame.pts:  # frames that never came out of the decoder
                if policy == "fail":
                    raise _damaged(info, share.start + index, "did not decode")
                damage.concealed += 1
                yield picture if previous is None else previous
                index += 1
            if frame.pts != expected[index]:
                continue  # a frame shown twice by a damaged stream: its slot is filled already
            yield picture
            previous = picture
            index += 1
            if index == len(expected):
                return
    if policy == "fail" or previous is None:
        raise _damaged(info, share.start + index, "did not decode")
    for _ in range(index, len(expected)):
        damage.concealed += 1
        yield previous


def _seek_before(container: av.container.InputContainer, stream: av.VideoStream, info: VideoInfo, pts: int) -> None:
    """Seek so that decoding starts at or before the keyframe shown at ``pts``.

    Most demuxers land on that keyframe. Some seek by decode time (AVI with B-frames, whose
    timestamps FFmpeg makes up) and land one packet late; then try the keyframe before, and so
    on. The place reached depends on the file and ``pts`` alone, never on the rank count.
    """
    keyframes = info.keyframe_pts[: bisect.bisect_right(info.keyframe_pts, pts)]
    for target in reversed(keyframes[1:]):
        container.seek(target, stream=stream, backward=True)
        first = next((packet for packet in container.demux(stream) if packet.size), None)
        if first is not None and first.pts is not None and first.pts <= pts:
            container.seek(target, stream=stream, backward=True)  # again: the peek used a packet
            return
    container.seek(0, stream=stream, backward=True)  # from the start: nothing earlier to land on


def _damaged(info: VideoInfo, frame: int, what: str) -> InputError:
    return InputError(
        f"input is damaged: frame {frame} {what} (on_damage=conceal keeps going and reports it): {info.path}"
    )


def _frames(
    container: av.container.InputContainer, stream: av.VideoStream, policy: str, damage: Damage, path: str
) -> Iterator[av.VideoFrame]:
    # demux() ends with an empty packet whose decode() drains the decoder's last frames.
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.InvalidDataError:
                if policy == "fail":
                    raise
                damage.packet_errors += 1
    except av.error.FFmpegError as err:
        raise InputError(f"input is damaged: reading or decoding failed ({err.strerror}): {path}") from None


@dataclass(frozen=True)
class EncodeSettings:
    codec: str = "libx264"
    pix_fmt: str = "yuv420p"
    crf: int | None = 18
    preset: str | None = "medium"
    bit_rate: int | None = None
    options: dict[str, str] = field(default_factory=dict)
    format: str | None = None  # container; the caller resolves it from the output's name
    threads: int = 8  # 0: the encoder chooses (by the CPUs this process may use)

    def apply(self, codec: av.VideoCodecContext, info: VideoInfo) -> None:
        """Size, pixel format, clock and options of an encoder for ``info``'s frames."""
        codec.width, codec.height = output_size(info.width, info.height)
        codec.pix_fmt = self.pix_fmt
        codec.thread_count = self.threads
        # Keep the input's clock so every frame keeps its exact timestamp (VFR included).
        codec.time_base = info.time_base
        if info.sample_aspect_ratio:
            codec.sample_aspect_ratio = info.sample_aspect_ratio
        if self.bit_rate:
            codec.bit_rate = self.bit_rate
        codec.options = self.encoder_options()

    def encoder_options(self) -> dict[str, str]:
        """The options the encoder is opened with: the user's, crf, preset, and what keeps the
        output the same bits everywhere."""
        options = {key: str(value) for key, value in self.options.items()}
        if self.crf is not None:
            options.setdefault("crf", str(self.crf))
        if self.preset is not None:
            options.setdefault("preset", self.preset)
        if self.codec in _X264:
            options["x264-params"] = _cpu_independent(options.get("x264-params", ""))
        return options


# x264 picks its assembly per CPU, and some of it rounds differently from the rest (or, in the
# AVX-512 macroblock-tree code of the build PyAV ships, reads memory it never wrote when a row
# is not a multiple of 8 macroblocks): the same frames then encode to different bits from one
# run, or one node, to the next. cpu-independent keeps those parts to one exact algorithm, for
# ~1% more encoder time, so a segment is the same bytes whichever rank, node or CPU encodes it.
_X264 = ("libx264", "libx264rgb")


def _cpu_independent(x264_params: str) -> str:
    named = {item.split("=", 1)[0].strip() for item in x264_params.split(":") if item}
    if "cpu-independent" in named:
        return x264_params  # the user's word on it stands
    return f"{x264_params}:cpu-independent=1" if x264_params else "cpu-independent=1"


def check_encoder(settings: EncodeSettings, info: VideoInfo, container_format: str | None) -> None:
    """Open (and drop) an encoder set up exactly as the ranks' will be, before hours of scoring
    depend on it."""
    try:
        av.CodecContext.create(settings.codec, "w")
    except (av.error.FFmpegError, ValueError) as err:
        raise ConfigError(f"video.codec '{settings.codec}' is not an encoder in this PyAV build ({err})") from None
    try:
        SegmentEncoder(info, settings, 0, container_format)
    except OutputError as err:
        raise ConfigError(
            f"the encoder {settings.codec} refuses these video settings "
            f"(pix_fmt={settings.pix_fmt}, crf={settings.crf}, preset={settings.preset}, options={settings.options}) "
            f"for {info.width}x{info.height} frames with time base {info.time_base}: {str(err).split(': ', 1)[-1]}"
        ) from None


def output_size(width: int, height: int) -> tuple[int, int]:
    """4:2:0 chroma needs even sides: odd sides grow by one edge-replicated pixel, never stretch."""
    return width + width % 2, height + height % 2


def _pad_even(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frame
    return np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


class _AudioCopier:
    """Copies the input's audio packets into the output, interleaved with the video by time."""

    def __init__(self, info: VideoInfo, output: av.container.OutputContainer) -> None:
        self._input = av.open(info.path, "r") if info.audio_streams else None
        self._map = {}
        self._packets: Iterator[av.Packet] = iter(())
        self._next: av.Packet | None = None
        if self._input is not None:
            streams = [self._input.streams[i] for i in info.audio_streams]
            for stream in streams:
                self._map[stream.index] = output.add_stream_from_template(stream)
            self._packets = self._input.demux(streams)
            self._advance()

    def _advance(self) -> None:
        for packet in self._packets:
            # Flush packets carry no data; muxing one would fail.
            if packet.size == 0:
                continue
            self._next = packet
            return
        self._next = None

    def mux_until(self, output: av.container.OutputContainer, seconds: float) -> None:
        """Mux every audio packet due by ``seconds``; one without a time goes with its predecessor."""
        while self._next is not None and (self._next.dts is None or float(self._next.dts * self._next.time_base) <= seconds):
            packet = self._next
            packet.stream = self._map[packet.stream_index]
            output.mux(packet)
            self._advance()

    def close(self) -> None:
        if self._input is not None:
            self._input.close()


@dataclass(frozen=True)
class EncodedPacket:
    """One compressed video frame, as a segment encoder made it (pts in the input's time base; the
    decode timestamps are made for the whole joined stream, :func:`stream_dts`)."""

    data: bytes
    pts: int
    keyframe: bool


def _wants_global_header(container_format: str | None) -> bool:
    """mp4, mov and mkv keep the codec headers (SPS/PPS) in the stream header, not in the frames."""
    if container_format is None:
        return False
    return bool(av.format.ContainerFormat(container_format, "w").flags & av.format.Flags.global_header.value)


class SegmentEncoder:
    """Encodes one segment of consecutive frames on its own: a rank encodes the segments it
    scored, and the root joins them by stream copy (:class:`Muxer`) without decoding.

    Each segment opens with a keyframe and is encoded independently, with settings fixed by
    the job alone, so its packets are the same bytes whichever rank encodes it.
    """

    def __init__(self, info: VideoInfo, settings: EncodeSettings, first_frame: int, container_format: str | None) -> None:
        self.info = info
        self._next = first_frame
        try:
            codec = av.CodecContext.create(settings.codec, "w")
            settings.apply(codec, info)
            codec.framerate = info.average_rate or Fraction(25)
            if _wants_global_header(container_format):
                codec.flags |= av.codec.context.Flags.global_header
            codec.open()
        except (av.error.FFmpegError, ValueError, TypeError) as err:
            raise OutputError(f"cannot open the encoder {settings.codec}: {err}") from None
        self._codec: av.VideoCodecContext = codec  # type: ignore[assignment]
        self._pix_fmt = settings.pix_fmt

    @property
    def extradata(self) -> bytes:
        """The codec headers the container needs (empty when they travel in the frames)."""
        return bytes(self._codec.extradata or b"")

    def encode(self, frames: np.ndarray) -> list[EncodedPacket]:
        """Encode RGB frames ``(n, H, W, 3)``, the next ``n`` of the segment; returns the packets ready so far."""
        packets: list[EncodedPacket] = []
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(_pad_even(frame), format="rgb24").reformat(format=self._pix_fmt)
            video_frame.pts = self.info.frame_pts[self._next]
            video_frame.time_base = self.info.time_base
            packets += self._encode(video_frame)
            self._next += 1
        return packets

    def finish(self) -> list[EncodedPacket]:
        # Encoding None drains the frames the encoder still holds (B-frames, lookahead).
        return self._encode(None)

    def _encode(self, frame: av.VideoFrame | None) -> list[EncodedPacket]:
        try:
            return [
                EncodedPacket(bytes(packet), packet.pts, packet.is_keyframe)
                for packet in self._codec.encode(frame)
                if packet.size  # an encoder may emit empty packets while it fills its queue
            ]
        except av.error.FFmpegError as err:
            raise OutputError(f"encoding failed ({self._codec.name}): {err.strerror}") from None


def stream_dts(decode_order_pts: Sequence[int]) -> list[int]:
    """Decode timestamps for a whole stream joined from independently encoded segments, given
    every packet's pts in decode order.

    Each encoder chose its own dts, and a short segment may have had no room for the B-frame
    delay the next one starts with, so they cannot simply be concatenated. Instead, with D the
    stream's largest reorder depth (how many places a packet is decoded before its frame is
    shown), packet k gets the (k - D)-th smallest pts: strictly increasing, never after the
    packet's own pts, and the same for any split of the stream. The first D packets count back
    from the first pts by the first frame step, as an encoder does. Pure; tested alone.
    """
    shown = sorted(decode_order_pts)
    if not shown:
        return []
    position = {pts: index for index, pts in enumerate(shown)}
    depth = max(0, max(k - position[pts] for k, pts in enumerate(decode_order_pts)))
    step = shown[1] - shown[0] if len(shown) > 1 else 1
    return [shown[k - depth] if k >= depth else shown[0] - (depth - k) * step for k in range(len(shown))]


class Muxer:
    """Writes the output file: the segments' packets in order, by stream copy, with the input's
    audio copied packet for packet and interleaved by time.

    ``dts`` are the decode timestamps of every video packet of the output (from
    :func:`stream_dts`). Use as a context manager; ``finish()`` must be called for a complete file.
    """

    def __init__(
        self, path: Path, info: VideoInfo, settings: EncodeSettings, dts: Sequence[int], container_format: str | None = None
    ) -> None:
        self.info = info
        self._written = 0
        self._dts = dts
        # bitexact: no random Matroska UIDs or library version strings, so the same job gives
        # the same file. mp4/mov: index at the front so players can start before it has all arrived.
        options = {"fflags": "+bitexact"}
        if container_format in ("mp4", "mov"):
            options["movflags"] = "+faststart"
        try:
            self._out = av.open(str(path), "w", format=container_format, options=options)
        except av.error.FFmpegError as err:
            raise OutputError(f"cannot create output {path}: {err.strerror}") from None
        try:
            # A stream set up exactly like the segments' encoders: the container's header then
            # carries the same codec headers (checked per segment in add()).
            stream = self._out.add_stream(settings.codec, rate=info.average_rate or Fraction(25))
            stream.time_base = info.time_base
            settings.apply(stream.codec_context, info)
            if info.rotation:
                stream.set_display_rotation(info.rotation)
            self._audio = _AudioCopier(info, self._out)
            self._out.start_encoding()
        except (av.error.FFmpegError, ValueError) as err:
            self._out.close()
            raise OutputError(f"cannot write {path} with codec '{settings.codec}': {err}") from None
        self._stream = stream
        self._headers = bytes(stream.codec_context.extradata or b"")

    def add(self, packets: Sequence[EncodedPacket], extradata: bytes) -> None:
        """Append one segment's packets (decode order); they follow the previous segment's."""
        if extradata != self._headers:
            raise OutputError(
                "a staged segment was encoded with other codec headers than this job's encoder makes "
                "(another FFmpeg/x264 build on some node?): delete the staging folder and run again"
            )
        time_base = self.info.time_base
        try:
            for encoded in packets:
                dts = self._dts[self._written]
                self._audio.mux_until(self._out, float(dts * time_base))
                packet = av.Packet(encoded.data)
                packet.pts, packet.dts, packet.time_base = encoded.pts, dts, time_base
                packet.is_keyframe = encoded.keyframe
                packet.stream = self._stream
                self._out.mux(packet)
                self._written += 1
        except av.error.FFmpegError as err:
            raise self._write_error(err) from None

    def finish(self) -> None:
        if self._written != self.info.frames:
            raise OutputError(f"the segments hold {self._written} frames, expected {self.info.frames}")
        try:
            self._audio.mux_until(self._out, math.inf)
        except av.error.FFmpegError as err:
            raise self._write_error(err) from None

    def _write_error(self, err: av.error.FFmpegError) -> OutputError:
        return OutputError(
            f"writing the {self._out.format.name} output failed: {err.strerror}"
            " (an audio codec this container cannot hold? try output=....mkv)"
        )

    def __enter__(self) -> Muxer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._audio.close()
        try:
            self._out.close()
        except av.error.FFmpegError as err:
            if exc[0] is None:
                raise OutputError(f"finishing the output failed: {err.strerror}") from None


def read_frames(path: str, indices: Sequence[int], info: VideoInfo) -> list[np.ndarray]:
    """Decode a few frames by index (for the preview), each from its own GOP."""
    frames = []
    starts = [start for start, _ in info.gop_bounds()]
    for index in indices:
        gop = bisect.bisect_right(starts, index) - 1
        share = shares_for(info, [range(gop, gop + 1)])[0]
        for offset, frame in enumerate(decode_share(info, share, "conceal")):
            if share.start + offset == index:
                frames.append(frame)
                break
    return frames
