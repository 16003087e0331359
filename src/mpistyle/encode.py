"""Encoding: the encoder settings every rank shares, and the encoder that turns one segment's
styled frames into packets on its own (it opens with a keyframe), so segments encoded on
different ranks join by stream copy (:mod:`mpistyle.mux`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, cast

import av
import av.error
import numpy as np

from .errors import ConfigError, OutputError
from .video import VideoInfo


@dataclass
class EncodeSettings:
    """How every rank's encoder is set up (``video.*`` in the config, which adds ``segment_seconds``)."""

    codec: str = "libx264"
    pix_fmt: str = "yuv420p"
    crf: int | None = 18
    preset: str | None = "medium"
    bit_rate: int | None = None
    options: dict[str, str] = field(default_factory=dict)  # extra encoder options, e.g. {tune: film}
    # Encoder threads. Fixed, because x264's output depends on its thread count, and an
    # automatic count follows the CPUs mpirun binds rank 0 to: with a fixed count the output is
    # the same bits whatever the rank count. 0: let the encoder choose.
    threads: int = 8
    format: str | None = None  # container; default: from the output's extension
    # auto: NVENC (h264_nvenc for libx264, hevc_nvenc for libx265, av1_nvenc for libsvtav1)
    # where every rank computes on a GPU that has one, else `codec` on the CPU; cpu; nvenc.
    encoder: str = "auto"
    nvenc_preset: str = "p5"  # p1 (fastest) to p7 (best)
    # x264's preset where every rank's model runs on a GPU with no NVENC: there x264 is the
    # slowest step (docs/gpu.md). null: `preset` everywhere. Other encoders keep `preset`.
    gpu_preset: str | None = "veryfast"
    nvenc_cq: int = 23  # constant quality, 0-51: lower is better (like crf)

    @classmethod
    def of(cls, video: Any) -> EncodeSettings:
        """The settings in a ``video`` config node (its other keys are not the encoder's)."""
        return cls(**{f.name: _plain(getattr(video, f.name)) for f in fields(cls)})

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
        if self.codec in X264:
            options["x264-params"] = _cpu_independent(options.get("x264-params", ""))
        return options


# x264 picks its assembly per CPU, and some of it rounds differently from the rest (or, in the
# AVX-512 macroblock-tree code of the build PyAV ships, reads memory it never wrote when a row
# is not a multiple of 8 macroblocks): the same frames then encode to different bits from one
# run, or one node, to the next. cpu-independent keeps those parts to one exact algorithm, for
# ~1% more encoder time, so a segment is the same bytes whichever rank, node or CPU encodes it.
X264 = ("libx264", "libx264rgb")


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


def _plain(value: Any) -> Any:
    """A config value as a plain Python one (``options`` is a config node)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
