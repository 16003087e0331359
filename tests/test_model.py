from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mpistyle.devices import pick_precision
from mpistyle.errors import ConfigError, ModelError
from mpistyle.model.loading import (
    default_multistyle_weights,
    load_multistyle,
    load_torchscript,
    load_transformer_net,
    style_vector,
)
from mpistyle.model.multistyle import NUM_STYLES
from mpistyle.model.transformer_net import TransformerNet
from mpistyle.scoring import Scorer, fitting_batch

from media import psnr


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(default_multistyle_weights()), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("style, blend", [(19, None), (0, None), (25, None), (0, {3: 0.5, 19: 0.5})])
@pytest.mark.parametrize("height, width", [(64, 64), (92, 160), (36, 48)])
def test_matches_onnxruntime(session: ort.InferenceSession, style: int, blend: dict | None, height: int, width: int) -> None:
    net = load_multistyle(style=style, blend=blend)
    # The exported graph has a batch of one.
    x = np.random.default_rng(height + style).random((1, 3, height, width), dtype=np.float32)
    weights = style_vector(style, blend).numpy()
    expected = session.run(None, {"image": x, "style_weights": weights})[0]
    with torch.inference_mode():
        actual = net(torch.from_numpy(x)).numpy()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize("height, width", [(45, 81), (7, 9), (2, 2), (1, 30)])
def test_any_frame_size_keeps_its_shape(height: int, width: int) -> None:
    net = load_multistyle()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, height, width))
    assert y.shape == (1, 3, height, width)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_styles_differ_and_blend_is_between() -> None:
    net = load_multistyle(style=3)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = net(x)
        net.set_style(style_vector(19))
        b = net(x)
    assert (a - b).abs().mean() > 0.05


def test_blend_accepts_text_and_normalises() -> None:
    vector = style_vector(0, "3:1,19:3")
    assert vector[3] == pytest.approx(0.25) and vector[19] == pytest.approx(0.75)
    assert float(vector.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("style, blend", [(26, None), (-1, None), (0, {40: 1.0}), (0, {3: -1.0}), (0, "nonsense"), (0, {3: 0.0})])
def test_bad_styles_are_config_errors(style: int, blend: object) -> None:
    with pytest.raises(ConfigError):
        style_vector(style, blend)


def test_wrong_checksum_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "multistyle26.onnx"
    data = bytearray(default_multistyle_weights().read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_multistyle(weights=str(copy))


def test_weights_of_the_default_are_all_loaded() -> None:
    net = load_multistyle()
    assert sum(p.numel() for p in net.parameters()) == 166_104
    assert net.style_weights.shape == (NUM_STYLES,)


def _random_transformer_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TransformerNet()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return net.state_dict()


def test_pytorch_examples_checkpoint_with_legacy_norm_keys(tmp_path: Path) -> None:
    state = _random_transformer_state()
    legacy = dict(state)
    # What checkpoints saved by old PyTorch carry for every InstanceNorm layer.
    for name in [k[: -len(".weight")] for k in state if k.split(".")[-2].startswith("in") and k.endswith("weight")]:
        channels = state[name + ".weight"].shape[0]
        legacy[name + ".running_mean"] = torch.zeros(channels)
        legacy[name + ".running_var"] = torch.ones(channels)
    path = tmp_path / "candy.pth"
    torch.save(legacy, path)
    model = load_transformer_net(str(path))
    reference = TransformerNet()
    reference.load_state_dict(state)
    x = torch.rand(1, 3, 32, 48)
    with torch.inference_mode():
        assert torch.allclose(model(x), reference(x * 255) / 255, atol=1e-5)


def test_torchscript_transformer_net(tmp_path: Path) -> None:
    net = TransformerNet().eval()
    net.load_state_dict(_random_transformer_state(1))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), path)
    model = load_transformer_net(str(path))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(model(x), net(x * 255) / 255, atol=1e-5)


def test_generic_torchscript_model(tmp_path: Path) -> None:
    class Invert(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1.0 - x

    path = tmp_path / "invert.pt"
    torch.jit.save(torch.jit.script(Invert()), path)
    model = load_torchscript(str(path))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(model(x), 1.0 - x)
    with pytest.raises(ModelError, match="not a TorchScript"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "state.pth")
        load_torchscript(str(tmp_path / "state.pth"))


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    state = _random_transformer_state()
    state["conv1.conv2d.weight"] = torch.zeros(16, 3, 9, 9)
    del state["deconv3.conv2d.bias"]
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match="does not fit TransformerNet") as err:
        load_transformer_net(str(path))
    assert "\n" not in str(err.value)
    assert "conv1.conv2d.weight" in str(err.value) and "deconv3.conv2d.bias" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_unreadable_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError):
        load_transformer_net(str(path))


def test_missing_checkpoint() -> None:
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        load_transformer_net(None)
    with pytest.raises(ModelError, match="not found"):
        load_transformer_net("/nonexistent/candy.pth")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A real photograph (scikit-image's, public domain), 128x128, as one frame."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])[None]


@pytest.mark.parametrize(
    "precision, compiled",
    [("bf16", False), ("fp16", False), ("auto", True)],  # auto + compiled: a long job's default path
    ids=["bf16", "fp16", "default-path"],
)
def test_each_precision_stays_within_40_db_of_fp32_on_a_real_picture(
    astronaut: np.ndarray, precision: str, compiled: bool
) -> None:
    model = load_multistyle(style=19)
    cpu = torch.device("cpu")
    reference = Scorer(model, cpu, 1, "fp32")(astronaut)
    scorer = Scorer(model, cpu, 1, pick_precision(precision, cpu), compile_model=compiled)
    assert (scorer.prepare(128, 128) == "eager") is not compiled
    assert psnr(reference, scorer(astronaut)) >= 40.0


def test_one_compiled_package_serves_every_style(astronaut: np.ndarray) -> None:
    # The package holds kernels, not weights: compiled for one style, it scores another with
    # that style's weights, read from the live model.
    cpu = torch.device("cpu")
    outputs = {}
    for style in (19, 5):
        scorer = Scorer(load_multistyle(style=style), cpu, 1, pick_precision("auto", cpu), compile_model=True)
        how = scorer.prepare(128, 128)
        assert how.startswith("compiled ahead of time"), how
        outputs[style] = scorer(astronaut)
        eager = Scorer(load_multistyle(style=style), cpu, 1, scorer.precision)(astronaut)
        assert psnr(eager, outputs[style]) >= 40.0
    assert "loaded in" in how  # the second style's: no new compile
    assert psnr(outputs[19], outputs[5]) < 25.0


def test_a_gpu_batch_is_as_many_frames_as_fit_in_a_fifth_of_the_gpu() -> None:
    gib = 2**30
    assert fitting_batch(80 * gib, gib // 2) == 8  # at most 8
    assert fitting_batch(16 * gib, gib) == 3  # a 16 GiB GPU (T4), 1 GiB a frame: 3.2 GiB is a fifth
    assert fitting_batch(16 * gib, 5 * gib) == 1  # none fits: 1, and running out of memory says what to do
    assert fitting_batch(80 * gib, gib // 2, most=3) == 3  # never more than batch_size


def test_a_batch_the_node_has_no_memory_for_is_a_config_error_naming_a_smaller_batch() -> None:
    # A real allocation failure: the process's address space is capped 1 GiB above what it
    # holds, and four 1080p frames need more (the first layer's output alone is 1 GiB in fp32).
    script = """
import resource, sys, numpy as np, torch
from mpistyle.errors import ConfigError
from mpistyle.model.loading import load_multistyle
from mpistyle.scoring import Scorer
torch.set_num_threads(1)
scorer = Scorer(load_multistyle(), torch.device("cpu"), 4, "fp32")
scorer.prepare(1080, 1920)
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
try:
    scorer(np.zeros((4, 1080, 1920, 3), np.uint8))
except ConfigError as err:
    print(err)
    sys.exit(err.exit_code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert done.stdout.strip() == (
        "this node (cpu) ran out of memory scoring a batch of 4 1920x1080 frame(s); other processes on it count too: "
        "try batch_size=2"
    )
