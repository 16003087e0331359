"""Everything PyAV: probe an input and index its packets, decode one share of frames, encode the
output and copy the input's audio into it packet for packet (or convert it, where the output's
container cannot hold it as it is).

Frames are identified by their presentation timestamp (pts, in the video stream's time base).
The index is read from packets alone, so the root never decodes frames for the other ranks.

Every input is opened the same way (:func:`_open_input`): a regular file, through FFmpeg's
``file`` protocol alone, with one of the single-file demuxers of :mod:`mpistyle.formats`.
"""
from __future__ import annotations

import bisect
import functools
import io
import itertools
import logging
import math
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import av.error
import numpy as np

from .errors import ConfigError, InputError, OutputError
from .formats import FORMAT_WHITELIST, PROTOCOL_WHITELIST, describe

log = logging.getLogger(__name__)

# Demuxers that FFmpeg uses for still images (and image sequences): not a video, whatever the
# extension says.
_STILL_IMAGE_FORMATS = ("image2", "_pipe")
# Seconds FFmpeg may take to open an input, and to read any one packet, before it gives up: a
# stalled file server fails the job instead of holding every rank forever. Generous, because
# shared storage under load is slow; a packet is at most a few MB.
_OPEN_TIMEOUT_S = 30.0
_READ_TIMEOUT_S = 30.0
# The FFmpeg log level is process-wide: one thread at a time may turn it up to read a refusal.
_LOG_LOCK = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """What an input may hold (``limits.*`` in the config); over any, it is refused (exit 3)
    before work starts. None: no limit."""

    bytes: int | None = None  # the input file's size
    frames: int | None = None  # video frames (counted while indexing, so a frame bomb stops early)
    duration_s: float | None = None  # the video's length (also while indexing)
    pixels: int | None = None  # per frame
    pixel_rate: float | None = None  # pixels per second of video: width x height x frames / duration
    # Every frame's pixels added up: the work the job is, whatever the clock says (300k repeated
    # 8K frames at 30 fps fit in 10 MB and pass every limit above at their defaults).
    total_pixels: int | None = None


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
    audio_streams: tuple[int, ...]  # the input's audio streams (indices): all go into the output (plan_audio)
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


def _open_input(path: str, genpts: bool = True, max_bytes: int | None = None) -> av.container.InputContainer:
    """Open an input for reading: a regular file, through the ``file`` protocol alone, with an
    allowed demuxer (:mod:`mpistyle.formats`), so nothing but that one file is ever read."""
    file = Path(path)
    if not file.exists():
        raise InputError(f"input not found: {path}")
    if file.is_dir():
        raise InputError(f"input is a directory, not a video file: {path}")
    if not file.is_file():
        # A FIFO or a device never ends (or blocks the open itself): refuse before FFmpeg waits on it.
        raise InputError(f"input is not a regular file (a pipe, device or socket?): {path}")
    if not os.access(file, os.R_OK):
        raise InputError(f"input is not readable (permission denied): {path}")
    size = file.stat().st_size
    if size == 0:
        raise InputError(f"input is empty (0 bytes): {path}")
    if max_bytes is not None and size > max_bytes:
        raise InputError(
            f"input is {size} bytes, over limits.bytes={max_bytes}: raise it (limits.bytes={size}) to accept it: {path}"
        )
    # "file:" + an absolute path: a name with a ':' in it is never taken for another protocol.
    url = "file:" + str(file.absolute())
    options = {"format_whitelist": FORMAT_WHITELIST, "protocol_whitelist": PROTOCOL_WHITELIST}
    if genpts:
        # Demuxers that leave some packets without a pts (AVI with B-frames) fill it in.
        options["fflags"] = "+genpts"
    try:
        return av.open(url, "r", container_options=options, timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S))
    except av.error.FFmpegError as err:
        refused = _refused_format(url, options) if isinstance(err, av.error.ArgumentError) else None
        if refused is None:
            raise InputError(f"input is not a video FFmpeg can read: {path} ({err.strerror})") from None
        if any(tag in refused for tag in _STILL_IMAGE_FORMATS):
            raise InputError(f"input is a still image ({refused}), not a video: {path}") from None
        raise InputError(
            f"input is in the {refused} format, which mpistyle does not open (it can make FFmpeg read other "
            f"files or streams); convert it to one of: {describe()}: {path}"
        ) from None


def _refused_format(url: str, options: dict[str, str]) -> str | None:
    """The demuxer FFmpeg picked for ``url`` and refused as not on the allow-list, or None if
    that is not why it failed. FFmpeg says which only in its log, so open once more with the
    log captured: it refuses right after probing, before it reads anything the input names."""
    with _LOG_LOCK:
        level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        try:
            with av.logging.Capture() as logs:
                try:
                    av.open(url, "r", container_options=options, timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S)).close()
                except av.error.FFmpegError:
                    pass  # expected: the reason is in the log
        finally:
            av.logging.set_level(level)
    return next((name for _, name, message in logs if message.startswith("Format not on whitelist")), None)


def probe(path: str, limits: Limits | None = None) -> VideoInfo:
    """Read the input's packet index (no decoding) and check it is a video we can process,
    within ``limits`` (none by default)."""
    limits = limits or Limits()
    with _open_input(path, max_bytes=limits.bytes) as container:
        if not container.streams.video:
            raise InputError(f"input has no video stream (audio only?): {path}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.name:
            raise InputError(f"input's video codec cannot be decoded by this PyAV build: {path}")
        try:
            av.codec.Codec(ctx.name, "r")
        except (av.error.FFmpegError, ValueError):  # UnknownCodecError is a ValueError
            raise InputError(f"no decoder for the video codec '{ctx.name}' in this PyAV build: {path}") from None
        if limits.pixels is not None and ctx.width * ctx.height > limits.pixels:
            raise InputError(
                f"frames of {ctx.width}x{ctx.height} are over limits.pixels={limits.pixels}: "
                f"raise it (limits.pixels={ctx.width * ctx.height}) if this node has the memory: {path}"
            )
        if stream.time_base is None:
            raise InputError(f"input's video stream has no time base: {path}")
        time_base = Fraction(stream.time_base)
        frame_pts, keyframes = _index(container, stream, time_base, limits, ctx.width * ctx.height, path)
        if not frame_pts:
            raise InputError(f"input has a video stream but no frames: {path}")
        frame_pts.sort()
        if len(set(frame_pts)) != len(frame_pts):
            raise InputError(f"input has frames with duplicate timestamps, which cannot be kept in order: {path}")
        keyframes = sorted(set(keyframes))
        rotation = _display_rotation(container, stream)
        info = VideoInfo(
            path=path,
            container=container.format.name,
            codec=ctx.name,
            width=ctx.width,
            height=ctx.height,
            time_base=time_base,
            average_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            sample_aspect_ratio=Fraction(ctx.sample_aspect_ratio) if ctx.sample_aspect_ratio else None,
            frame_pts=tuple(frame_pts),
            keyframe_pts=tuple(keyframes),
            audio_streams=tuple(s.index for s in container.streams.audio),
            dropped_streams=tuple(_describe(s) for s in container.streams if _dropped(s, stream)),
            rotation=rotation,
        )
    _check_pixel_rate(info, limits.pixel_rate)
    return info


def _dropped(stream: av.stream.Stream, video: av.VideoStream) -> bool:
    """The one rule for every kind of stream: the first video stream is scored, audio is copied
    (or converted), and everything else (more video, cover art, subtitles, data and timecode
    tracks, attachments) is left out and named."""
    return stream.type != "audio" and stream.index != video.index


def _describe(stream: av.stream.Stream) -> str:
    """e.g. "subtitle #2 (ssa)", "attachment #3 (notes.txt)", "data #2 (klv)"."""
    what = stream.codec_context.name if stream.codec_context else getattr(stream, "name", None)
    what = what or stream.metadata.get("handler_name") or "unknown"
    if stream.disposition & av.stream.Disposition.attached_pic:
        what += ", attached picture"
    return f"{stream.type} #{stream.index} ({what})"


def _video_packets(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.Packet]:
    """The video stream's packets in file order, less the empty flush packet the demuxer ends with."""
    return (packet for packet in container.demux(stream) if packet.size)


def _index(
    container: av.container.InputContainer, stream: av.VideoStream, time_base: Fraction, limits: Limits, pixels: int,
    path: str,
) -> tuple[list[int], list[int]]:
    """Every frame's pts and the keyframes' pts, from the packets alone. The frame and duration
    limits are checked packet by packet: a file of millions of tiny repeated frames stops here
    at the limit, not after indexing them all."""
    frame_pts: list[int] = []
    keyframes: list[int] = []
    max_packets: float = limits.frames if limits.frames is not None else math.inf
    max_work: float = math.inf
    if limits.total_pixels is not None and pixels > 0:
        max_work = limits.total_pixels // pixels  # frames of this size the total allows
    max_span = limits.duration_s / time_base if limits.duration_s is not None else math.inf
    packets = 0
    lowest, highest = math.inf, -math.inf  # the frames' pts so far
    try:
        for packet in _video_packets(container, stream):
            # Every packet counts, the ones skipped below too: they are read all the same.
            packets += 1
            if packets > max_packets:
                raise InputError(
                    f"input has more than limits.frames={limits.frames} video frames: raise limits.frames "
                    f"if it is really that long: {path}"
                )
            if packets > max_work:
                raise InputError(
                    f"input holds more than limits.total_pixels={limits.total_pixels} pixels ({packets} frames of "
                    f"{pixels} pixels so far): raise limits.total_pixels if it is really that much work: {path}"
                )
            # Edit lists mark packets the decoder must drop: not a frame of the video.
            if packet.is_discard:
                continue
            if packet.pts is None:
                raise InputError(f"input has video packets without timestamps, which cannot be placed: {path}")
            if packet.is_keyframe:
                keyframes.append(packet.pts)
            elif not keyframes:
                continue  # before the first keyframe nothing decodes: a straight decode skips it
            frame_pts.append(packet.pts)
            lowest, highest = min(lowest, packet.pts), max(highest, packet.pts)
            if highest - lowest > max_span:
                raise InputError(
                    f"input runs longer than limits.duration_s={limits.duration_s} (at least "
                    f"{float((highest - lowest) * time_base):.0f} s so far): raise limits.duration_s to accept it: {path}"
                )
    except av.error.FFmpegError as err:
        raise InputError(
            f"input is damaged: reading its packets failed at packet {len(frame_pts)} ({err.strerror}): {path}"
        ) from None
    return frame_pts, keyframes


def _check_pixel_rate(info: VideoInfo, limit: float | None) -> None:
    """Pixels per second of video, over the whole file (a short clip of huge frames at a
    thousand frames a second is as much work per second as hours of HD)."""
    if limit is None or info.duration_s <= 0:
        return  # one frame: no rate
    rate = info.width * info.height * info.frames / info.duration_s
    if rate > limit:
        raise InputError(
            f"input has {rate:.0f} pixels per second ({info.width}x{info.height} at {info.frames / info.duration_s:.1f} "
            f"frames/s), over limits.pixel_rate={limit}: raise it (limits.pixel_rate={math.ceil(rate)}) to accept it: {info.path}"
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


def decode_share(
    info: VideoInfo, share: Share, policy: str = "fail", damage: Damage | None = None
) -> Generator[np.ndarray, None, None]:
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
            if (frame.width, frame.height) != (info.width, info.height):
                # The plan (limits.pixels, the encoder, every buffer) was made for the size in
                # the stream's header; a stream may change it later (a new SPS), even grow.
                number = share.start + bisect.bisect_left(expected, frame.pts)
                raise InputError(
                    f"input changes its frame size: frame {number} is {frame.width}x{frame.height}, "
                    f"the stream's header says {info.width}x{info.height} (not supported): {info.path}"
                )
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


# What an audio stream the output's container cannot hold as it is becomes: every container
# mpistyle writes (mp4, mov, mkv) holds AAC, and FFmpeg has its own encoder for it.
AUDIO_FALLBACK = "aac"


@dataclass(frozen=True)
class AudioTrack:
    """One input audio stream and how it gets into the output, decided before any frame is scored."""

    stream: int  # the input's stream index
    codec: str
    convert: bool = False  # decode and encode as AAC: the container cannot hold the packets as they are

    @property
    def action(self) -> str:
        return f"converted to {AUDIO_FALLBACK}" if self.convert else "copied"


def plan_audio(info: VideoInfo, container_format: str) -> tuple[AudioTrack, ...]:
    """Each audio stream of the input copied into ``container_format`` where that takes its
    packets (a trial mux into memory says so, the finished file included), else converted to
    AAC. A stream that can be neither is refused now, not after every frame has been scored."""
    if not info.audio_streams:
        return ()
    tracks = []
    with _open_input(info.path, genpts=False) as container:
        streams = [cast(av.AudioStream, container.streams[index]) for index in info.audio_streams]
        first = _first_packets(container, streams)
        for stream in streams:
            codec = stream.codec_context.name if stream.codec_context else "unknown"
            if _trial_mux(container_format, stream, first.get(stream.index)) is None:
                tracks.append(AudioTrack(stream.index, codec))
                continue
            failure = _trial_mux(container_format, stream, None, convert=True)
            if failure is not None:
                what_to_do = (
                    "write Matroska instead (output=NAME.mkv)" if container_format != "matroska"
                    else "convert or remove that audio stream first"
                )
                raise InputError(
                    f"the input's audio stream #{stream.index} ({codec}) can neither be copied into {container_format} "
                    f"nor converted to {AUDIO_FALLBACK} ({failure}): {what_to_do}: {info.path}"
                )
            tracks.append(AudioTrack(stream.index, codec, convert=True))
    return tuple(tracks)


def _first_packets(container: av.container.InputContainer, streams: Sequence[av.AudioStream]) -> dict[int, av.Packet]:
    """Each stream's first packet with data, in one pass that stops once every stream has one
    (a stream without any is read to the end of the file once, not once per stream)."""
    first: dict[int, av.Packet] = {}
    for packet in container.demux(streams):
        if packet.size and packet.stream_index not in first:
            first[packet.stream_index] = packet
            if len(first) == len(streams):
                break
    return first


def _trial_mux(
    container_format: str, template: av.AudioStream, packet: av.Packet | None, convert: bool = False
) -> str | None:
    """Write a throwaway file in memory with ``template``'s stream, copied (with ``packet`` in
    it) or converted; None if that worked, else what failed. Some refusals come only as the
    file is finished (mp4 and PCM)."""
    try:
        with av.open(io.BytesIO(), "w", format=container_format) as trial:
            stream = _add_fallback(trial, template) if convert else trial.add_stream_from_template(template)
            trial.start_encoding()
            if packet is not None:
                packet.stream = stream
                trial.mux(packet)
    except av.error.FFmpegError as err:
        return err.strerror
    except ValueError as err:
        return str(err)
    return None


# The usual speaker layout for a channel count, for audio that does not name its own (PCM in
# AVI says "2 channels", which the AAC encoder refuses).
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _add_fallback(output: av.container.OutputContainer, template: av.AudioStream) -> av.AudioStream:
    """An AAC stream for ``template``'s sound: its layout, and its rate where AAC has it (else
    48 kHz; PyAV's encoder resamples and re-frames what it is given)."""
    ctx = template.codec_context
    if ctx is None or not ctx.name:
        raise ValueError("no decoder for this audio")
    av.codec.Codec(ctx.name, "r")  # raises when this build cannot decode it
    rate = ctx.sample_rate if ctx.sample_rate in (av.codec.Codec(AUDIO_FALLBACK, "w").audio_rates or ()) else 48000
    layout = ctx.layout.name
    if layout == f"{ctx.layout.nb_channels} channels":  # no speaker positions given
        layout = _DEFAULT_LAYOUTS.get(ctx.layout.nb_channels, layout)
    stream = cast(av.AudioStream, output.add_stream(AUDIO_FALLBACK, rate=rate))
    stream.layout = layout
    return stream


class _AudioCopier:
    """Copies the input's audio packets into the output, interleaved with the video by time,
    or decodes and encodes the ones :func:`plan_audio` found the container cannot hold."""

    def __init__(self, info: VideoInfo, output: av.container.OutputContainer, tracks: Sequence[AudioTrack]) -> None:
        self._input = _open_input(info.path, genpts=False) if tracks else None
        self._map: dict[int, av.stream.Stream] = {}
        self._convert: dict[int, tuple[av.AudioStream, av.AudioStream]] = {}  # input stream -> (decoder, encoder)
        self._packets: Iterator[av.Packet] = iter(())
        self._next: av.Packet | None = None
        self.damaged = 0  # audio packets left out of a conversion because they did not decode
        if self._input is not None:
            streams = [cast(av.AudioStream, self._input.streams[track.stream]) for track in tracks]
            for stream, track in zip(streams, tracks, strict=True):
                if track.convert:
                    self._convert[stream.index] = (stream, _add_fallback(output, stream))
                else:
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
            if packet.stream_index in self._convert:
                self._encode(output, packet.stream_index, packet)
            else:
                packet.stream = self._map[packet.stream_index]
                output.mux(packet)
            self._advance()

    def finish(self, output: av.container.OutputContainer) -> None:
        """Mux what is left, and drain the converters' decoders and encoders."""
        self.mux_until(output, math.inf)
        for index in self._convert:
            self._encode(output, index, None)

    def _encode(self, output: av.container.OutputContainer, index: int, packet: av.Packet | None) -> None:
        decoder, encoder = self._convert[index]
        try:
            # Decoding None drains the decoder; encoding None then drains the encoder.
            frames = list(decoder.decode(packet))
        except av.error.InvalidDataError:
            self.damaged += 1  # a damaged audio packet is left out, as a player skips it
            return
        for frame in [*frames, None] if packet is None else frames:
            output.mux(encoder.encode(frame))

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
    # Flags is an enum.Flag whose values are ints (the stubs say Flags).
    return bool(av.format.ContainerFormat(container_format, "w").flags & cast(int, av.format.Flags.global_header.value))


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
            codec = cast(av.VideoCodecContext, av.CodecContext.create(settings.codec, "w"))
            settings.apply(codec, info)
            codec.framerate = info.average_rate or Fraction(25)
            if _wants_global_header(container_format):
                codec.flags |= av.codec.context.Flags.global_header
            codec.open()
        except (av.error.FFmpegError, ValueError, TypeError) as err:
            raise OutputError(f"cannot open the encoder {settings.codec}: {err}") from None
        self._codec = codec
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
                EncodedPacket(bytes(packet), cast(int, packet.pts), packet.is_keyframe)  # an encoder's packets have one
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
    audio copied packet for packet (or converted, as ``audio`` from :func:`plan_audio` says;
    default: every audio stream copied) and interleaved by time.

    ``dts`` are the decode timestamps of every video packet of the output (from
    :func:`stream_dts`). Use as a context manager; ``finish()`` must be called for a complete file.
    """

    def __init__(
        self,
        path: Path,
        info: VideoInfo,
        settings: EncodeSettings,
        dts: Sequence[int],
        container_format: str | None = None,
        audio: Sequence[AudioTrack] | None = None,
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
        if audio is None:
            audio = [AudioTrack(index, "") for index in info.audio_streams]
        copier: _AudioCopier | None = None
        try:
            # A stream set up exactly like the segments' encoders: the container's header then
            # carries the same codec headers (checked per segment in add()).
            stream = cast(av.VideoStream, self._out.add_stream(settings.codec, rate=info.average_rate or Fraction(25)))
            stream.time_base = info.time_base
            settings.apply(stream.codec_context, info)
            if info.rotation:
                stream.set_display_rotation(info.rotation)
            copier = _AudioCopier(info, self._out, audio)
            self._out.start_encoding()
        except (InputError, av.error.FFmpegError, ValueError) as err:
            if copier is not None:
                copier.close()
            self._out.close()
            if isinstance(err, InputError):
                raise  # the input went away since the plan
            raise OutputError(f"cannot write {path} with codec '{settings.codec}': {err}") from None
        self._audio = copier
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
            self._audio.finish(self._out)
        except av.error.FFmpegError as err:
            raise self._write_error(err) from None
        if self._audio.damaged:
            log.warning("%d damaged audio packet(s) did not decode and were left out of the converted audio", self._audio.damaged)

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
