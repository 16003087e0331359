"""The CUDA path: scoring at each precision, NVDEC decoding, NVENC encoding, ranks sharing a GPU.

These are the only tests that skip: without a CUDA GPU (every CI run), and NVENC's where the
GPU has no encoder (A100, H100, H200). ``bench/gpu.sh`` runs them on a GPU machine.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mpistyle.devices import pick_precision
from mpistyle.encode import EncodeSettings
from mpistyle.errors import ConfigError
from mpistyle.hwcodecs import cuvid_name, pick_decoder, pick_encoder
from mpistyle.model.loading import load_multistyle
from mpistyle.scoring import Scorer, fitting_batch
from mpistyle.segment import Segment
from mpistyle.video import Cuvid, decode_segment, probe

from conftest import run_mpistyle
from media import audio_packets, decode_all, psnr

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A real photograph (scikit-image's, public domain), 256x256, as one frame."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::2, ::2])[None]


@pytest.mark.parametrize(
    "precision, compiled",
    [("fp32", False), ("bf16", False), ("fp16", False), ("auto", True)],  # auto + compiled: a long job's default
    ids=["fp32", "bf16", "fp16", "default-path"],
)
def test_cuda_output_within_40_db_of_cpu_fp32_on_a_real_picture(astronaut: np.ndarray, precision: str, compiled: bool) -> None:
    model = load_multistyle(style=19)
    reference = Scorer(load_multistyle(style=19), torch.device("cpu"), 1, "fp32")(astronaut)
    scorer = Scorer(model, GPU, 8, pick_precision(precision, GPU), compile_model=compiled)
    how = scorer.prepare(*astronaut.shape[1:3])
    assert (how == "eager") is not compiled, how
    if compiled:
        assert scorer.kernels == "jit", how  # compiled in the process (a CUDA package crashed torch 2.11's loader)
    assert psnr(reference, scorer(astronaut)) >= 40.0


def test_a_batch_is_as_many_frames_as_fit_and_one_that_does_not_fit_says_what_to_set() -> None:
    scorer = Scorer(load_multistyle(), GPU, None, "bf16")  # batch_size=null, the default
    scorer.prepare(2160, 3840)
    total = torch.cuda.get_device_properties(GPU).total_memory
    assert scorer.frame_bytes is not None and 0 < scorer.frame_bytes < 8 * 2**30, scorer.frame_bytes
    assert scorer.batch_size == fitting_batch(total, scorer.frame_bytes)
    frames = np.zeros((2, 2160, 3840, 3), np.uint8)
    assert scorer(frames).shape == frames.shape
    del scorer
    torch.cuda.empty_cache()
    # A real out-of-memory: this process may now take only 1 GiB of the GPU.
    torch.cuda.set_per_process_memory_fraction(2**30 / total, GPU)
    try:
        eight = Scorer(load_multistyle(), GPU, 8, "bf16")
        expected = r"the GPU \(cuda:0\) ran out of memory scoring a batch of 8 3840x2160 frame\(s\).*try batch_size=4"
        with pytest.raises(ConfigError, match=expected):
            eight.prepare(2160, 3840)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, GPU)
        torch.cuda.empty_cache()


def _clip(video: Callable[..., Path], name: str = "in.mp4", **kwargs: object) -> Path:
    defaults: dict[str, object] = {"frames": 48, "width": 320, "height": 180, "fps": 24, "gop": 12}
    return video(name, **{**defaults, **kwargs})


def _timestamps(path: Path, cuvid: Cuvid | None) -> list[int]:
    """Every frame's pts as the decoder gives it, in output order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = cuvid.open(stream) if cuvid else stream.codec_context
        return [frame.pts for packet in container.demux(stream) for frame in codec.decode(packet)]


@pytest.mark.parametrize("codec, name", [("libx264", "in.mp4"), ("libx265", "in.mkv")])
def test_cuvid_decodes_the_same_frames_and_timestamps_as_the_cpu(video: Callable[..., Path], codec: str, name: str) -> None:
    path = _clip(video, name, codec=codec)
    info = probe(str(path))
    cuvid_codec = cuvid_name(info.codec)
    assert cuvid_codec is not None, f"this PyAV build has no {info.codec}_cuvid"
    chosen = pick_decoder("cuvid", info, GPU)
    assert chosen == Cuvid(cuvid_codec, 0)
    assert pick_decoder("auto", info, GPU) is None  # the CPU's, until cuvid measures faster
    assert _timestamps(path, chosen) == _timestamps(path, None)
    for segment in (Segment(0, 0, info.frames, None), info.segments(0.7)[1]):  # whole, and one from a seek
        cpu = np.stack(list(decode_segment(info, segment)))
        gpu = np.stack(list(decode_segment(info, segment, cuvid=chosen)))
        assert len(gpu) == len(cpu) == segment.frames
        # The same pictures up to the rounding of the conversion to RGB (NV12 from the GPU,
        # yuv420p from the CPU): an H200 once gave pixels up to 49 levels apart.
        assert psnr(cpu, gpu) >= 40.0


def _nvenc_or_skip(info_path: Path) -> str:
    info = probe(str(info_path))
    name = pick_encoder(EncodeSettings(), info, GPU, "mp4")
    if name is None:
        pytest.skip(f"this GPU ({torch.cuda.get_device_name(GPU)}) has no NVENC encoder (A100, H100 and H200 have none)")
    return name


def test_nvenc_output_keeps_every_frame_timestamp_and_the_audio(video: Callable[..., Path], tmp_path: Path) -> None:
    source = _clip(video)
    name = _nvenc_or_skip(source)
    out = tmp_path / "out.mp4"
    done = run_mpistyle(f"input={source}", f"output={out}", "device=cuda", "video.encoder=nvenc", "report.preview_frames=0")
    assert done.returncode == 0, done.stderr
    assert probe(str(out)).frame_pts == probe(str(source)).frame_pts
    assert audio_packets(out) == audio_packets(source)
    report = json.loads(out.with_suffix(".mp4.report.json").read_text())
    assert {rank["encoder"] for rank in report["per_rank"]} == {name}


def _job(source: Path, out: Path, ranks: int | None, *extra: str) -> dict[str, object]:
    done = run_mpistyle(f"input={source}", f"output={out}", "device=cuda", "report.preview_frames=0", *extra, ranks=ranks)
    assert done.returncode == 0, done.stderr
    return json.loads(Path(f"{out}.report.json").read_text())


def test_two_ranks_share_one_gpu_and_write_the_same_file_as_one(video: Callable[..., Path], tmp_path: Path) -> None:
    source = _clip(video, frames=96)
    one = _job(source, tmp_path / "one.mp4", None)
    two = _job(source, tmp_path / "two.mp4", 2)
    assert [rank["device"] for rank in two["per_rank"]] == ["cuda:0", "cuda:0"]  # type: ignore[index]
    assert all(rank["frames"] > 0 for rank in two["per_rank"])  # type: ignore[attr-defined]
    assert {rank["batch"] for rank in two["per_rank"]} == {8}  # type: ignore[attr-defined]
    decoders = {rank["decoder"] for rank in two["per_rank"]}  # type: ignore[attr-defined]
    assert decoders == {"h264"}, decoders  # video.decoder=auto: the CPU's
    assert (tmp_path / "one.mp4").read_bytes() == (tmp_path / "two.mp4").read_bytes()
    frames, _ = decode_all(tmp_path / "two.mp4")
    assert len(frames) == 96
    assert one["frames"] == two["frames"] == 96
