"""The training loop of ``mpistyle-train``: data-parallel over MPI ranks.

Every rank holds the whole TransformerNet (1.7 M parameters, 6.7 MB) and an identical optimiser.
Each step, every rank trains on its own slice of the step's global batch; the gradients are
averaged with one ``MPI_Allreduce`` of a flat buffer (:meth:`RankContext.mean_in_place`), and
every rank takes the same Adam step, so all ranks keep the same weights (rank 0's are the ones
written). Nothing here talks to MPI itself: every collective is a :class:`RankContext` method.

Why a plain mpi4py Allreduce rather than torch.distributed (gloo/NCCL) with DDP: the job already
has an MPI communicator from the launcher (mpirun or srun), so there is no second rendezvous
(no address and port to agree on, no network interface for gloo to guess on multi-homed cluster
nodes); and the gradient is so small next to the work of a step (VGG19 forward and backward over
the batch) that overlapping communication with the backward pass, DDP's gain, is worth little: a
6.7 MB allreduce takes milliseconds, a step at 256x256 tens to hundreds. On GPUs the buffer goes
through host memory, which works with any MPI build, CUDA-aware or not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .. import signals
from ..config import plain
from ..devices import pick_device, set_threads
from ..errors import ConfigError, InternalError, JobInterrupted
from ..files import fingerprint
from ..model.loading import load_vgg19
from ..model.transformer_net import TransformerNet
from ..parallel import RankContext
from . import config as train_config
from . import data
from .checkpoint import load_checkpoint, save_checkpoint, save_state_dict, set_rng_state
from .files import RunFiles
from .losses import PerceptualLoss

log = logging.getLogger("mpistyle")

LOSS_KEYS = ("content", "style", "tv", "total")
# Settings whose change on resume makes the run a different experiment: worth a warning.
_MEANINGFUL = ("style_image", "content", "image_size", "style_size", "batch_size", "video_every", "lr",
               "content_weight", "style_weight", "tv_weight", "seed", "vgg")


@dataclass
class Setup:
    """What every rank builds before the first step."""

    content: data.ContentSet
    loss: PerceptualLoss
    sample: torch.Tensor


def run(cfg: DictConfig, ctx: RankContext) -> Path:
    """Train as ``cfg`` says (resuming from ``cfg.run_dir``'s checkpoint if there is one) and
    return the path of the trained net's state dict. Every rank calls this."""
    files = _run_files(cfg)
    ctx.from_root(files.prepare)
    device = ctx.check_all(lambda: pick_device(cfg.device, ctx.local_rank))
    threads = set_threads(cfg.threads, ctx.cpus)
    setup = ctx.check_all(lambda: build_setup(cfg, device))
    training = _Training.begin(cfg, ctx, files, setup, device)
    if ctx.is_root:
        log.info(
            "training %s on %s: %d content image(s), %d rank(s) x batch %d at %dpx, %s, %d thread(s); steps %d-%d",
            Path(cfg.style_image).name, cfg.content, len(setup.content), ctx.size, cfg.batch_size,
            cfg.image_size, device, threads, training.resumed_at + 1, cfg.steps,
        )
    training.train()
    training.finish()
    return files.output


def _run_files(cfg: DictConfig) -> RunFiles:
    """Check ``cfg`` and name what the run writes: the run directory's files and the model."""
    train_config.check(cfg)
    if not cfg.run_dir:
        raise ConfigError("no run directory: add run_dir=PATH")
    run_dir = Path(cfg.run_dir).expanduser()
    output = Path(cfg.output).expanduser() if cfg.output else run_dir / f"{Path(cfg.style_image).stem}.pth"
    return RunFiles(run_dir, output)


@dataclass
class _Training:
    """One run on this rank, from the step after ``resumed_at`` (0: a fresh net) to the end."""

    cfg: DictConfig
    ctx: RankContext
    files: RunFiles
    setup: Setup
    device: torch.device
    net: TransformerNet
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]  # what checkpoints record: the resolved settings and the inputs' digests
    resumed_at: int

    @classmethod
    def begin(cls, cfg: DictConfig, ctx: RankContext, files: RunFiles, setup: Setup, device: torch.device) -> _Training:
        net = TransformerNet().to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        # Rank 0 decides where training starts (fresh or from the checkpoint) and sends it to all,
        # so every rank starts from the same weights without needing the run directory itself.
        inputs = ctx.from_root(lambda: _inputs_digest(cfg, setup.content))
        start = ctx.from_root(lambda: _initial_state(cfg, files, inputs))
        _restore(cfg, start, net, optimizer)
        config = plain(cfg)
        config["inputs"] = inputs
        return cls(cfg, ctx, files, setup, device, net, optimizer, config, start["step"])

    def train(self) -> None:
        """Every step up to ``cfg.steps``, with loss lines, samples and checkpoints when due."""
        first = self.resumed_at + 1
        step_fn = make_step(self.cfg, self.ctx, self.setup, self.net, self.optimizer, self.device)
        params = list(self.net.parameters())
        meter = _Meter(self.cfg.batch_size * self.ctx.size)
        clock = _Clock(first, self.cfg.steps)
        for step in range(first, self.cfg.steps + 1):
            try:
                local = self.ctx.check_all(lambda: step_fn(step))  # noqa: B023  (called at once, in this iteration)
            except JobInterrupted as err:
                raise self._stopped(step, err) from None
            losses = average_over_ranks(self.ctx, params, local)
            self.optimizer.step()
            meter.add(losses)
            self._after_step(step, first, meter, clock)

    def _stopped(self, step: int, err: JobInterrupted) -> JobInterrupted:
        """Save a checkpoint for a signal that came at ``step``; the error that says how to resume."""
        # Nobody took this step's optimiser step: the weights are those after step - 1.
        self.ctx.from_root(lambda: self._save_checkpoint(step - 1))
        name = signal.Signals(err.exit_code - 128).name if err.exit_code > 128 else "a signal"
        return JobInterrupted(
            f"stopped by {name} after step {step - 1}: checkpoint saved in {self.files.checkpoint}; "
            f"run the same command with run_dir={self.files.run_dir} to resume",
            exit_code=err.exit_code,
        )

    def _after_step(self, step: int, first: int, meter: _Meter, clock: _Clock) -> None:
        cfg = self.cfg
        due_log = step % cfg.log_every == 0 or step in (first, cfg.steps)
        due_sample = cfg.sample_every > 0 and step % cfg.sample_every == 0 and step != cfg.steps
        due_checkpoint = step % cfg.checkpoint_every == 0 and step != cfg.steps
        if not (due_log or due_sample or due_checkpoint):
            if self.ctx.is_root and clock.due():  # between loss lines: no other rank takes part
                log.info("step %d/%d (%.0f%%), %s", step, cfg.steps, 100 * step / cfg.steps, clock.eta(step))
            return

        def on_root() -> None:
            if due_log:
                clock.due()  # a loss line is progress too
                _log_losses(self.files, step, cfg.steps, meter.take(), clock.eta(step))
            if due_sample:
                _sample(self.files, step, self.net, self.setup.sample, self.device)
            if due_checkpoint:
                self._save_checkpoint(step)

        if due_checkpoint:
            _check_replicas(self.ctx, self.net)
        self.ctx.from_root(on_root)

    def finish(self) -> None:
        """Rank 0 writes the last checkpoint, the trained net and its sample."""

        def on_root() -> None:
            done = max(self.cfg.steps, self.resumed_at)
            self._save_checkpoint(done)
            save_state_dict(self.files.output, self.net)
            sample = _sample(self.files, done, self.net, self.setup.sample, self.device)
            log.info("trained to step %d: the model is %s (sample %s)", done, self.files.output, sample)

        _check_replicas(self.ctx, self.net)
        self.ctx.from_root(on_root)

    def _save_checkpoint(self, step: int) -> None:
        save_checkpoint(self.files.checkpoint, step, self.net, self.optimizer, self.config)


def _restore(cfg: DictConfig, start: dict[str, Any], net: TransformerNet, optimizer: torch.optim.Optimizer) -> None:
    """Load the state training starts from (see :func:`_initial_state`) into this rank's copies."""
    net.load_state_dict(start["model"])
    if start["optimizer"] is not None:
        optimizer.load_state_dict(start["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr  # the command line wins over the checkpoint
    if start["rng"] is not None:
        set_rng_state(start["rng"])


def _check_replicas(ctx: RankContext, net: TransformerNet) -> None:
    """Every rank must hold the same weights (only rank 0's are saved): compare digests before
    each checkpoint, so a divergence (say, an MPI build whose allreduce gives ranks different
    roundings) stops the run instead of silently training N different nets."""
    if ctx.size == 1:
        return
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = ctx.gather_all(digest.hexdigest())
    if len(set(digests)) > 1:
        raise InternalError(f"the ranks' weights diverged (digests {', '.join(d[:12] for d in digests)})")
    if ctx.is_root:
        log.info("all %d ranks hold identical weights (sha256 %s)", ctx.size, digests[0][:16])


def build_setup(cfg: DictConfig, device: torch.device) -> Setup:
    content = data.open_content(Path(cfg.content).expanduser(), cfg.image_size, cfg.video_every)
    style = data.style_tensor(Path(cfg.style_image).expanduser(), cfg.style_size)
    layers = [cfg.vgg.content_layer, *cfg.vgg.style_layers]
    vgg = load_vgg19(cfg.vgg.weights, layers=layers, sha256=cfg.vgg.weights_sha256).to(device)
    loss = PerceptualLoss(
        vgg, style.to(device), cfg.vgg.content_layer, list(cfg.vgg.style_layers),
        cfg.content_weight, cfg.style_weight, cfg.tv_weight,
    )
    sample_path = Path(cfg.sample_image).expanduser() if cfg.sample_image else None
    return Setup(content, loss, data.sample_tensor(content, sample_path, cfg.image_size))


def _inputs_digest(cfg: DictConfig, content: data.ContentSet) -> dict[str, str]:
    """Root only: what identifies the pictures a run learns from (the style image's bytes; the
    content folder's file names and sizes, or the video's size and SHA-256)."""
    style = hashlib.sha256(Path(cfg.style_image).expanduser().read_bytes()).hexdigest()
    source = Path(cfg.content).expanduser()
    if isinstance(content, data.ImageFolder):
        listing = [f"{p.relative_to(source)}:{p.stat().st_size}" for p in content.paths]
    else:
        listing = [json.dumps(fingerprint(source), sort_keys=True)]
    return {"style_image": style, "content": hashlib.sha256("\n".join(listing).encode()).hexdigest()}


def _initial_state(cfg: DictConfig, files: RunFiles, inputs: dict[str, str]) -> dict[str, Any]:
    """Root only: the checkpoint's state if the run directory has one, else a fresh net."""
    if files.checkpoint.exists():
        state = load_checkpoint(files.checkpoint)
        trained_on = state.get("config", {}).get("inputs", inputs)
        changed = [key for key in ("style_image", "content") if trained_on.get(key) != inputs[key]]
        if changed:
            # Resuming would silently mix two styles (or two datasets) in one net.
            raise ConfigError(
                f"{files.run_dir} holds a checkpoint trained on another {' and '.join(changed).replace('_', ' ')}: "
                f"use another run_dir to start a new training, or restore the pictures it was trained on"
            )
        log.info("resuming from %s at step %d", files.checkpoint, state["step"])
        _warn_changed(state.get("config", {}), plain(cfg))
        files.keep_losses_up_to(state["step"])
        return state
    files.keep_losses_up_to(0)
    torch.manual_seed(cfg.seed)
    return {"step": 0, "model": TransformerNet().state_dict(), "optimizer": None, "rng": None}


def _warn_changed(old: dict[str, Any], new: Any) -> None:
    changed = [f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in _MEANINGFUL if old.get(key) != new.get(key)]
    if changed:
        log.warning("resuming with changed settings: %s", ", ".join(changed))


def make_step(
    cfg: DictConfig, ctx: RankContext, setup: Setup, net: TransformerNet, optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> Callable[[int], torch.Tensor]:
    """This rank's part of a step: a function of the step number that fills the gradients of
    ``net`` from this rank's slice of the step's global batch."""
    global_batch = cfg.batch_size * ctx.size

    def step_fn(step: int) -> torch.Tensor:
        """This rank's forward and backward pass; returns its losses (in LOSS_KEYS order)."""
        # Checked before the work, inside check_all: every rank learns of a signal any rank got
        # at the same step, so all stop together and none waits in the allreduce.
        signals.check()
        crops = ctx.own_slice(data.crop_plan(cfg.seed, step, global_batch, len(setup.content)))
        images = data.batch(setup.content, crops, cfg.image_size).to(device)
        optimizer.zero_grad(set_to_none=False)
        losses = setup.loss(net(images), images)
        losses["total"].backward()
        return torch.stack([losses[key].detach() for key in LOSS_KEYS])

    return step_fn


def average_over_ranks(ctx: RankContext, params: list[torch.nn.Parameter], losses: torch.Tensor) -> dict[str, float]:
    """Average the gradients and the losses over the ranks, in place, in one allreduce; the
    losses by name."""
    grads: list[torch.Tensor] = []
    for param in params:
        assert param.grad is not None  # every parameter takes part in the loss
        grads.append(param.grad)
    ctx.mean_in_place([*grads, losses])
    return dict(zip(LOSS_KEYS, losses.tolist(), strict=True))


class _Clock:
    """This run's pace, for the progress lines: seconds a step so far and the time left."""

    interval_s = 30.0  # at least this often a progress line, however far apart loss lines are

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.started = self.shown = time.monotonic()

    def due(self) -> bool:
        """Whether a progress line is due (and, if so, the next one is ``interval_s`` away)."""
        now = time.monotonic()
        if now - self.shown < self.interval_s:
            return False
        self.shown = now
        return True

    def eta(self, step: int) -> str:
        per_step = (time.monotonic() - self.started) / (step - self.first + 1)
        return f"{per_step:.2f} s/step, ETA {_duration(per_step * (self.steps - step))}"


def _duration(seconds: float) -> str:
    """``3 h 12 min``, ``4 min 5 s``, ``12 s``."""
    whole = round(seconds)
    hours, minutes, rest = whole // 3600, whole // 60 % 60, whole % 60
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


class _Meter:
    """Mean losses and throughput since the last log line."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self._sums = dict.fromkeys(LOSS_KEYS, 0.0)
        self._steps = 0
        self._since = time.monotonic()

    def add(self, losses: dict[str, float]) -> None:
        for key in LOSS_KEYS:
            self._sums[key] += losses[key]
        self._steps += 1

    def take(self) -> dict[str, float]:
        now = time.monotonic()
        steps = max(1, self._steps)
        result = {key: value / steps for key, value in self._sums.items()}
        result["images_per_s"] = self._steps * self.images_per_step / max(now - self._since, 1e-9)
        self._sums, self._steps, self._since = dict.fromkeys(LOSS_KEYS, 0.0), 0, now
        return result


def _log_losses(files: RunFiles, step: int, steps: int, losses: dict[str, float], eta: str) -> None:
    log.info(
        "step %d/%d: content %.4g, style %.4g, tv %.4g, total %.4g (%.1f images/s, %s)",
        step, steps, losses["content"], losses["style"], losses["tv"], losses["total"], losses["images_per_s"], eta,
    )
    files.append_losses({"step": step, **{key: round(value, 6) for key, value in losses.items()}})


def _sample(files: RunFiles, step: int, net: TransformerNet, sample: torch.Tensor, device: torch.device) -> Path:
    with torch.no_grad():
        styled = net(sample.to(device)).cpu()
    return files.write_sample(step, sample, styled)
