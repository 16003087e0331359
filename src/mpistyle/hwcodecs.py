"""Which decoder and encoder a rank uses: FFmpeg's GPU codecs in PyAV (NVDEC through the
``*_cuvid`` decoders, NVENC through the ``*_nvenc`` encoders) where the rank computes on a
CUDA GPU that has them, the CPU's otherwise. No MPI: the ranks' choices are agreed on in
:mod:`mpistyle.pipeline`.

The data-centre compute GPUs (A100, H100, H200) have NVDEC but no NVENC; T4, A10, L4 and L40S
have both. Whether a GPU has one is learnt the only reliable way: by opening it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import av

from .encode import X264, EncodeSettings, SegmentEncoder
from .errors import ConfigError, OutputError
from .video import Cuvid, VideoInfo, open_input

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DECODERS = ("auto", "cpu", "cuvid")
ENCODERS = ("auto", "cpu", "nvenc")

# The NVENC encoder that stands in for each CPU encoder: same format, other implementation.
_NVENC = {"libx264": "h264_nvenc", "libx265": "hevc_nvenc", "libsvtav1": "av1_nvenc"}


# FFmpeg's NVDEC decoders are named after the codec, except these.
_CUVID = {"mpeg2video": "mpeg2_cuvid", "mpeg1video": "mpeg1_cuvid"}


def cuvid_name(codec: str) -> str | None:
    """The NVDEC decoder for a stream's codec in this PyAV build (``h264`` -> ``h264_cuvid``)."""
    name = _CUVID.get(codec, f"{codec}_cuvid")
    return name if name in av.codecs_available else None


def pick_decoder(setting: str, info: VideoInfo, device: torch.device) -> Cuvid | None:
    """``video.decoder``: the cuvid decoder this rank decodes ``info``'s video with, or None
    for the CPU. ``cuvid`` where the rank's device is a CUDA GPU, the codec has one and it
    opens there (exit 2 where not).

    ``auto`` is the CPU for now: on an H200 node (16 cores) the CPU decoded 1080p H.264 to RGB
    at 359 frames/s and cuvid at 116, each decoder opened per segment costs more on the GPU,
    and cuvid's pictures, converted to RGB, were up to 49 levels off the CPU decoder's
    (bench/results/gpu-20261128-h200-run*.json)."""
    if setting in ("cpu", "auto"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"video.decoder=cuvid but this rank computes on {device}: use video.decoder=auto or cpu")
    name = cuvid_name(info.codec)
    cuvid = Cuvid(name, device.index or 0) if name else None
    why = _cuvid_refusal(cuvid, info) if cuvid else f"this PyAV build has no {info.codec}_cuvid decoder"
    if cuvid is not None and why is None:
        return cuvid
    raise ConfigError(f"video.decoder=cuvid cannot decode this {info.codec} video on {device}: {why}")


def _cuvid_refusal(cuvid: Cuvid, info: VideoInfo) -> str | None:
    """Why the decoder does not open for this input on its GPU (no NVDEC, no driver library), or None."""
    try:
        with open_input(info.path) as container:
            cuvid.open(container.streams.video[0])
    except ConfigError as err:
        return str(err)
    return None


def pick_encoder(settings: EncodeSettings, info: VideoInfo, device: torch.device, container_format: str) -> str | None:
    """``video.encoder``: the NVENC encoder this rank would encode with, or None for the CPU's
    (``video.codec``). ``auto``: NVENC where the rank's device is a CUDA GPU that has one for
    the codec; ``nvenc`` insists (exit 2 where it cannot)."""
    if settings.encoder == "cpu":
        return None
    name = _NVENC.get(settings.codec)
    if device.type != "cuda" or name is None or name not in av.codecs_available:
        if settings.encoder == "nvenc":
            where = (
                f"this rank computes on {device}" if device.type != "cuda"
                else f"no NVENC encoder for {settings.codec} in this PyAV build"
            )
            raise ConfigError(f"video.encoder=nvenc but {where}: use video.encoder=auto or cpu")
        return None
    try:
        SegmentEncoder(info, on_nvenc(settings, name, device), 0, container_format)
    except OutputError as err:
        why = str(err).split(": ", 1)[-1]
        if settings.encoder == "nvenc":
            raise ConfigError(f"video.encoder=nvenc but {name} does not open on {device} ({why})") from None
        log.info(
            "encoding on the CPU (%s, %d threads): %s does not open on %s (%s)",
            settings.codec, settings.threads, name, device, why,
        )
        return None
    return name


def beside_gpu(settings: EncodeSettings) -> EncodeSettings:
    """The CPU encoder's settings for ranks whose model runs on a GPU (``video.gpu_preset``):
    x264 is then their slowest step, and on styled frames veryfast encoded 2.4x as fast as
    medium at the same size (crf 18, 1080p, bench in docs/gpu.md)."""
    return replace(settings, preset=settings.gpu_preset) if settings.gpu_preset and settings.codec in X264 else settings


def encoder_key(settings: EncodeSettings) -> str:
    """A short name for the encoder as opened (``h264_nvenc-1a2b3c4d``): staged segments made
    with other encoder settings than the plan's are kept apart (they would not join)."""
    options = {key: value for key, value in settings.encoder_options().items() if key != "gpu"}  # the same on every rank
    opened = json.dumps([settings.codec, options], sort_keys=True)
    return f"{settings.codec}-{hashlib.sha256(opened.encode()).hexdigest()[:8]}"


def on_nvenc(settings: EncodeSettings, name: str, device: torch.device | None = None) -> EncodeSettings:
    """``settings`` for the NVENC encoder ``name`` (on ``device``'s GPU): its own preset and
    quality (``video.nvenc_preset``, ``video.nvenc_cq``); ``video.options`` are the CPU
    encoder's and stay with it."""
    options = {"preset": settings.nvenc_preset, "rc": "vbr", "cq": str(settings.nvenc_cq), "b": "0"}
    if device is not None and device.index:
        options["gpu"] = str(device.index)
    return replace(settings, codec=name, crf=None, preset=None, bit_rate=None, options=options)
