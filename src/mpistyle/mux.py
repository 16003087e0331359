"""Muxing: the output file, written by the root from the staged segments' packets by stream copy,
with decode timestamps made anew for the whole stream and the input's audio copied packet for
packet (or converted where the output's container cannot hold it)."""
from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import av.error

from .encode import EncodedPacket, EncodeSettings
from .errors import InputError, OutputError
from .video import VideoInfo, open_input

log = logging.getLogger(__name__)


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
    with open_input(info.path, genpts=False) as container:
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
        self._input = open_input(info.path, genpts=False) if tracks else None
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


def reorder_depth(decode_order_pts: Sequence[int]) -> int:
    """How many places a packet of one segment is decoded before its frame is shown, at most
    (the encoder's B-frame delay, as it used it in this segment). Pure."""
    position = {pts: index for index, pts in enumerate(sorted(decode_order_pts))}
    return max((k - position[pts] for k, pts in enumerate(decode_order_pts)), default=0)


def stream_dts(shown_pts: Sequence[int], depth: int) -> list[int]:
    """Decode timestamps for a whole stream joined from independently encoded segments: its
    frames' pts ``shown_pts`` (ascending) and ``depth``, the largest :func:`reorder_depth` of
    its segments (the segments' pts do not overlap, so that is the whole stream's).

    Each encoder chose its own dts, and a short segment may have had no room for the B-frame
    delay the next one starts with, so they cannot simply be concatenated. Instead packet k gets
    the (k - depth)-th smallest pts: strictly increasing, never after the packet's own pts, and
    the same for any split of the stream. The first ``depth`` packets count back from the first
    pts by the first frame step, as an encoder does. Pure; tested alone.
    """
    if not shown_pts:
        return []
    step = shown_pts[1] - shown_pts[0] if len(shown_pts) > 1 else 1
    return [shown_pts[k - depth] if k >= depth else shown_pts[0] - (depth - k) * step for k in range(len(shown_pts))]


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
