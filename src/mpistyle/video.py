"""Reading the input with PyAV: probe it and index its packets, and decode one segment's frames
(:mod:`mpistyle.encode` and :mod:`mpistyle.mux` write the output).

Frames are identified by their presentation timestamp (pts, in the video stream's time base).
The index is read from packets alone, so the root never decodes frames for the other ranks.

Every input is opened the same way (:func:`open_input`): a regular file, through FFmpeg's
``file`` protocol alone, with one of the single-file demuxers of :mod:`mpistyle.formats`.
"""
from __future__ import annotations

import bisect
import functools
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

from .errors import ConfigError, InputError, first_line
from .formats import FORMAT_WHITELIST, PICTURE_WHITELIST, PROTOCOL_WHITELIST, describe
from .segment import Segment

log = logging.getLogger(__name__)

# Demuxers that FFmpeg uses for still images (and image sequences): not a video, whatever the
# extension says.
_STILL_IMAGE_FORMATS = ("image2", "_pipe")
# Seconds FFmpeg may take to open an input, and to read any one packet, before it gives up: a
# stalled file server fails the job instead of holding every rank forever. Generous, because
# shared storage under load is slow; a packet is at most a few MB.
_OPEN_TIMEOUT_S = 30.0
_READ_TIMEOUT_S = 30.0
# At most this many frames decoded per frame scored, in any segment cut inside a long GOP (the
# frames from its keyframe to its start are decoded and dropped): decoding is cheap next to the
# model (640x360 H.264: 0.4 ms a frame against 50-100 ms for the model on a CPU core, so 8 is
# at most ~5% of a CPU rank's time), but a segment late in a one-keyframe hour would otherwise
# decode the whole hour. Smaller: longer late segments, and ranks that end further apart.
_MAX_DECODE_RATIO = 8
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

    @functools.cached_property
    def gop_starts(self) -> tuple[int, ...]:
        """The first frame of each GOP (keyframe to keyframe); frames shown before the first
        keyframe count with the first GOP."""
        return (0, *(bisect.bisect_left(self.frame_pts, pts) for pts in self.keyframe_pts[1:]))

    def _seconds(self, start: int, stop: int) -> float:
        """How long frames ``[start, stop)`` are shown (to the end of the video for the last)."""
        end = self.frame_pts[stop] if stop < self.frames else self.frame_pts[0] + self.duration_s / self.time_base
        return float((end - self.frame_pts[start]) * self.time_base)

    def segments(self, min_seconds: float) -> tuple[Segment, ...]:
        """The video cut into segments of at least ``min_seconds`` (the last may be shorter):
        the units that are scored, staged and encoded independently.

        A segment ends at the first keyframe that makes it long enough, unless that keyframe is
        more than twice as far (a long GOP, or no keyframe at all after the first): then it ends
        on the timeline, mid-GOP, and the next segment decodes from the keyframe before its
        first frame, dropping the frames before it. So every rank has work on any input. Deep in
        a long GOP segments grow, so that none decodes more than ``_MAX_DECODE_RATIO`` frames
        per frame it scores. 0 makes every GOP a segment. Segments depend on the input alone, never on the rank
        count, so the output is the same bits however many ranks share the work.
        """
        segments: list[Segment] = []
        start = 0
        while start < self.frames:
            stop = self._segment_stop(start, min_seconds)
            segments.append(self._frames_from(start, stop, len(segments)))
            start = stop
        return tuple(segments)

    def _segment_stop(self, start: int, min_seconds: float) -> int:
        starts = self.gop_starts
        after = bisect.bisect_right(starts, start)  # the GOPs that start after ``start``
        # The first of them that makes the segment long enough (the end of the video if none).
        gop = bisect.bisect_left(starts, min_seconds, after, key=lambda frame: self._seconds(start, frame))
        at_keyframe = starts[gop] if gop < len(starts) else self.frames
        if min_seconds <= 0:
            return at_keyframe
        # Decoding starts at the keyframe of the GOP holding ``start``: a segment deep in a long
        # GOP is made long enough that it decodes at most _MAX_DECODE_RATIO frames per frame it scores.
        lead = self._seconds(starts[after - 1], start)
        wanted = max(min_seconds, lead / (_MAX_DECODE_RATIO - 1))
        if wanted <= self._seconds(start, at_keyframe) <= 2 * wanted:
            return at_keyframe
        # A long GOP: cut on the timeline, at the first frame ``wanted`` seconds in, unless what
        # would be left before the next keyframe (or the end) is shorter than that: a short
        # segment deep in the GOP would decode too much for the frames it scores.
        cut = bisect.bisect_left(range(self.frames), wanted, start + 1, key=lambda frame: self._seconds(start, frame))
        return at_keyframe if cut >= at_keyframe or self._seconds(cut, at_keyframe) < wanted else cut

    def _frames_from(self, start: int, stop: int, number: int) -> Segment:
        """Frames ``[start, stop)`` as a segment, decoded from the keyframe at or before ``start``."""
        gop = bisect.bisect_right(self.gop_starts, start) - 1
        return Segment(number, start, stop, None if gop == 0 else self.keyframe_pts[gop])

    def gop_of(self, frame: int) -> Segment:
        """The GOP that holds ``frame``, as a segment that decodes on its own."""
        starts = self.gop_starts
        gop = bisect.bisect_right(starts, frame) - 1
        return self._frames_from(starts[gop], starts[gop + 1] if gop + 1 < len(starts) else self.frames, 0)


def open_input(path: str, genpts: bool = True, max_bytes: int | None = None) -> av.container.InputContainer:
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
    with open_input(path, max_bytes=limits.bytes) as container:
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


def open_picture(path: Path, max_pixels: int | None = None) -> av.container.InputContainer:
    """Open a picture (a style image) for reading: that one file, through the ``file`` protocol
    alone, with a single-picture demuxer or an allowed video one (a video gives its first frame).
    With ``max_pixels``, FFmpeg decodes nothing larger while it opens the file (it decodes the
    picture to learn its size): the stream's size is then 0 x 0."""
    # pattern_type=none: image2 reads a name like img%03d.png as that one file, never a sequence.
    options = {"protocol_whitelist": PROTOCOL_WHITELIST, "format_whitelist": PICTURE_WHITELIST, "pattern_type": "none"}
    streams = {"max_pixels": str(max_pixels)} if max_pixels is not None else {}
    return av.open("file:" + str(path.absolute()), "r", container_options=options, options=streams,
                   timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S))


def probe_picture(path: str, limits: Limits | None = None) -> tuple[int, int]:
    """Check that ``path`` is a picture the style-image reader takes, within ``limits`` (its
    bytes, and its pixels before anything larger is decoded), by decoding its first frame as
    the reader does; its width and height. :class:`InputError` says what is wrong."""
    limits = limits or Limits()
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path} is not there (or not a regular file)")
    size = file.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    if limits.bytes is not None and size > limits.bytes:
        raise InputError(f"{path} is {size} bytes, over the limit of {limits.bytes} for a picture")
    try:
        with open_picture(file, limits.pixels) as container:
            stream = container.streams.video[0] if container.streams.video else None
            if stream is None or not stream.codec_context.width * stream.codec_context.height:
                over = f", or over limits.pixels={limits.pixels}" if limits.pixels is not None else ""
                raise InputError(f"{path} is not a picture FFmpeg can read{over}")
            frame = next(container.decode(stream))
    except (av.error.FFmpegError, OSError, ValueError, StopIteration) as err:
        reason = first_line(err) if str(err).strip() else "no picture in it"
        raise InputError(f"{path} cannot be read as a picture: {reason}") from None
    return frame.width, frame.height


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


@dataclass(frozen=True)
class Cuvid:
    """An NVDEC decoder (``h264_cuvid``, ``hevc_cuvid``, ...) on one GPU, by its index."""

    name: str
    gpu: int = 0

    def open(self, stream: av.VideoStream) -> av.VideoCodecContext:
        """A decoder for ``stream``'s packets; its frames come back to host memory (NV12)."""
        codec = cast(av.VideoCodecContext, av.CodecContext.create(self.name, "r"))
        source = stream.codec_context
        codec.width, codec.height = source.width, source.height
        if source.extradata:
            codec.extradata = source.extradata
        codec.options = {"gpu": str(self.gpu)}
        try:
            codec.open()
        except (av.error.FFmpegError, ValueError) as err:
            # Not the input's fault (exit 3 would make the watcher quarantine a good video).
            raise ConfigError(
                f"the GPU decoder {self.name} does not open on GPU {self.gpu} ({err}): use video.decoder=cpu"
            ) from None
        return codec


@dataclass
class Decoded:
    """Frames the decoder produced, the ones before a segment (from its keyframe on) included."""

    frames: int = 0


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


def decode_segment(
    info: VideoInfo,
    segment: Segment,
    policy: str = "fail",
    damage: Damage | None = None,
    decoded: Decoded | None = None,
    cuvid: Cuvid | None = None,
) -> Generator[np.ndarray, None, None]:
    """Yield the segment's frames as RGB ``(H, W, 3)`` uint8 arrays, in presentation order.

    Decoding starts at the segment's keyframe (the one at or before its first frame), and the
    frames before the segment are dropped (counted in ``decoded`` with the rest): each frame
    equals what a straight decode of the file gives.

    Damage (a corrupt frame, a rejected packet, a frame of the index that never decodes) raises
    :class:`InputError` under ``policy="fail"``. Under ``"conceal"`` it is counted in
    ``damage``: corrupt frames are kept as FFmpeg concealed them, and a frame that never decodes
    is replaced by the one before it, so the output keeps every timestamp.

    With ``cuvid``, the GPU decodes (NVDEC) and the frames come back to host memory (NV12),
    converted to RGB here: not always the CPU decoder's pictures to the bit (docs/gpu.md).
    """
    if segment.frames == 0:
        return
    damage = damage if damage is not None else Damage()
    expected = info.frame_pts[segment.start : segment.stop]
    first, last = expected[0], expected[-1]
    index = 0
    previous: np.ndarray | None = None
    with open_input(info.path) as container:
        stream = container.streams.video[0]
        # Frame threads speed decoding up without changing any decoded pixel.
        stream.thread_type = "AUTO"
        codec = cuvid.open(stream) if cuvid else stream.codec_context
        if segment.seek_pts is not None:
            _seek_before(container, stream, info, segment.seek_pts)
        for frame in _frames(container, stream, policy, damage, info.path, segment.seek_pts is not None, codec):
            if decoded is not None:
                decoded.frames += 1
            if frame.pts is None or not first <= frame.pts <= last:
                continue  # another segment's frame (the seek may land a GOP early)
            if (frame.width, frame.height) != (info.width, info.height):
                # The plan (limits.pixels, the encoder, every buffer) was made for the size in
                # the stream's header; a stream may change it later (a new SPS), even grow.
                number = segment.start + bisect.bisect_left(expected, frame.pts)
                raise InputError(
                    f"input changes its frame size: frame {number} is {frame.width}x{frame.height}, "
                    f"the stream's header says {info.width}x{info.height} (not supported): {info.path}"
                )
            if frame.is_corrupt:
                if policy == "fail":
                    raise _damaged(info, segment.start + index, "is corrupt")
                damage.damaged += 1
            picture = frame.to_ndarray(format="rgb24")
            while expected[index] < frame.pts:  # frames that never came out of the decoder
                if policy == "fail":
                    raise _damaged(info, segment.start + index, "did not decode")
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
        raise _damaged(info, segment.start + index, "did not decode")
    for _ in range(index, len(expected)):
        damage.concealed += 1
        yield previous


def _seek_before(container: av.container.InputContainer, stream: av.VideoStream, info: VideoInfo, pts: int) -> None:
    """Seek so that the first keyframe read after it is the one shown at ``pts``, or an earlier one.

    Demuxers land in different places: most on that keyframe; some after it (AVI with B-frames,
    whose timestamps FFmpeg makes up, and MPEG-TS land a packet or more late), where the next
    packet may even be shown earlier (an open GOP's leading B-frame). So after each try, read on
    to the first keyframe: if it is shown after ``pts``, the seek landed too late, and the
    keyframe before is tried, and so on. The place reached depends on the file and ``pts``
    alone, never on the rank count.
    """
    keyframes = info.keyframe_pts[: bisect.bisect_right(info.keyframe_pts, pts)]
    for target in reversed(keyframes[1:]):
        container.seek(target, stream=stream, backward=True)
        landed = _first_keyframe(container, stream, pts)
        if landed is not None and landed.pts is not None and landed.pts <= pts:
            container.seek(target, stream=stream, backward=True)  # again: the peek used packets
            return
    container.seek(0, stream=stream, backward=True)  # from the start: nothing earlier to land on


def _first_keyframe(container: av.container.InputContainer, stream: av.VideoStream, pts: int) -> av.Packet | None:
    """The first keyframe packet from where the container stands, or None once a packet is
    decoded after the keyframe shown at ``pts`` would be (its dts is past ``pts``: a keyframe's
    dts is at most its pts, and dts only grow), so a late landing costs a few packets, not a GOP."""
    for packet in container.demux(stream):
        if packet.dts is not None and packet.dts > pts:
            return None
        if packet.size and packet.is_keyframe:
            return packet
    return None


def _damaged(info: VideoInfo, frame: int, what: str) -> InputError:
    return InputError(
        f"input is damaged: frame {frame} {what} (on_damage=conceal keeps going and reports it): {info.path}"
    )


def _frames(
    container: av.container.InputContainer, stream: av.VideoStream, policy: str, damage: Damage, path: str,
    from_keyframe: bool = False, codec: av.VideoCodecContext | None = None,
) -> Iterator[av.VideoFrame]:
    """The stream's frames from where the container stands; with ``from_keyframe``, from the
    first keyframe on (a seek may land mid-GOP, where nothing decodes). ``codec``: the decoder
    (default: the stream's own)."""
    codec = codec or stream.codec_context
    started = not from_keyframe
    # demux() ends with an empty packet whose decode() drains the decoder's last frames.
    try:
        for packet in container.demux(stream):
            started = started or (packet.is_keyframe and bool(packet.size))
            if not started:
                continue
            try:
                yield from codec.decode(packet)
            except av.error.InvalidDataError:
                if policy == "fail":
                    raise
                damage.packet_errors += 1
    except av.error.FFmpegError as err:
        if codec is not stream.codec_context:  # the GPU's decoder: the GPU or its driver may be at fault
            raise ConfigError(
                f"the GPU decoder {codec.name} failed ({err.strerror}) on {path}: try video.decoder=cpu"
            ) from None
        raise InputError(f"input is damaged: reading or decoding failed ({err.strerror}): {path}") from None


def read_frames(path: str, indices: Sequence[int], info: VideoInfo) -> list[np.ndarray]:
    """Decode a few frames by index (for the preview), each from its own GOP."""
    frames = []
    for index in indices:
        gop = info.gop_of(index)
        for offset, frame in enumerate(decode_segment(info, gop, "conceal")):
            if gop.start + offset == index:
                frames.append(frame)
                break
    return frames
