"""Choosing each rank's decoder and encoder (hwcodecs.py), on this machine's CPU: what a GPU-less
rank says when asked for NVDEC or NVENC, and how the encoder beside a GPU is set. The GPU side
itself is tests/test_gpu.py's."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mpistyle.encode import EncodeSettings
from mpistyle.errors import ConfigError
from mpistyle.hwcodecs import beside_gpu, encoder_key, on_nvenc, pick_decoder, pick_encoder
from mpistyle.video import probe

from conftest import run_mpistyle

CPU = torch.device("cpu")


def test_a_cpu_rank_decodes_and_encodes_on_the_cpu_unless_told_otherwise(video: Callable[..., Path]) -> None:
    info = probe(str(video()))
    assert pick_decoder("auto", info, CPU) is None
    assert pick_decoder("cpu", info, CPU) is None
    assert pick_encoder(EncodeSettings(), info, CPU, "mp4") is None
    with pytest.raises(ConfigError, match=r"video\.decoder=cuvid but this rank computes on cpu"):
        pick_decoder("cuvid", info, CPU)
    with pytest.raises(ConfigError, match=r"video\.encoder=nvenc but this rank computes on cpu"):
        pick_encoder(replace(EncodeSettings(), encoder="nvenc"), info, CPU, "mp4")


def test_nvenc_takes_its_own_quality_settings_and_leaves_the_cpu_encoders_behind() -> None:
    settings = replace(EncodeSettings(), options={"tune": "film"}, nvenc_preset="p3", nvenc_cq=30)
    nvenc = on_nvenc(settings, "h264_nvenc")
    assert nvenc.codec == "h264_nvenc"
    assert nvenc.encoder_options() == {"preset": "p3", "rc": "vbr", "cq": "30", "b": "0"}  # no crf, tune or x264-params
    # Ranks on different GPUs open it with their own index, yet stage into one folder.
    assert encoder_key(on_nvenc(settings, "h264_nvenc", torch.device("cuda", 1))) == encoder_key(nvenc)
    assert encoder_key(nvenc) != encoder_key(on_nvenc(replace(settings, nvenc_cq=31), "h264_nvenc"))


def test_beside_a_gpu_the_cpu_encoder_takes_the_gpu_preset() -> None:
    assert beside_gpu(EncodeSettings()).preset == "veryfast"
    assert beside_gpu(replace(EncodeSettings(), gpu_preset=None)).preset == "medium"
    assert encoder_key(beside_gpu(EncodeSettings())) != encoder_key(EncodeSettings())
    svt = replace(EncodeSettings(), codec="libsvtav1", preset="8")  # another encoder's presets: its own
    assert beside_gpu(svt) == svt


@pytest.mark.parametrize(
    "override, message",
    [
        ("video.decoder=cuvid", "video.decoder=cuvid but this rank computes on cpu"),
        ("video.encoder=nvenc", "video.encoder=nvenc but this rank computes on cpu"),
        ("video.decoder=nvdec", "video.decoder must be one of auto, cpu, cuvid, got 'nvdec'"),
        ("video.nvenc_cq=60", "video.nvenc_cq must be 0 to 51"),
        ("video.gpu_preset=turbo", "video.gpu_preset=turbo: the encoder libx264 refuses"),
    ],
)
def test_gpu_codec_settings_a_job_cannot_have_are_refused_before_work(
    video: Callable[..., Path], tmp_path: Path, override: str, message: str
) -> None:
    done = run_mpistyle(f"input={video()}", f"output={tmp_path / 'out.mp4'}", "device=cpu", override)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_the_report_names_each_ranks_decoder_and_encoder(video: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    done = run_mpistyle(f"input={video()}", f"output={out}", "device=cpu", "report.preview_frames=0")
    assert done.returncode == 0, done.stderr
    ranks = json.loads(Path(f"{out}.report.json").read_text())["per_rank"]
    assert [(rank["decoder"], rank["encoder"]) for rank in ranks] == [("h264", "libx264")]
