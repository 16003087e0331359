"""Batches of frames in, batches of frames out, on one device. No MPI, no files: the model is
built from its config node, on the device this rank was given."""
from __future__ import annotations

import logging

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from .devices import pick_device, set_threads
from .errors import ConfigError, ModelError, MpistyleError


def default_batch_size(device: torch.device) -> int:
    """Batches feed a GPU; on a CPU one frame at a time was fastest (bigger batches mostly add
    page faults for the larger activations: 176 vs 196 ms/frame at 640x360 on 2 cores)."""
    return 8 if device.type == "cuda" else 1


log = logging.getLogger(__name__)


class Scorer:
    """Applies a frame model to uint8 RGB frames ``(n, H, W, 3)`` and returns the same layout."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int, compile_model: bool = False) -> None:
        self.device = device
        self.batch_size = batch_size
        self.eager = model.to(device).eval()
        # torch.compile: about 2x the eager speed on CPU (bench: 360p and 720p), after a
        # first call that compiles (15-30 s, a few s from Inductor's cache). Its kernels round
        # differently with the thread count, so it is opt-in: eager output is the same bits
        # whatever the rank count.
        self.compiled = compile_model
        self.model: nn.Module = torch.compile(self.eager, dynamic=False) if compile_model else self.eager  # type: ignore[assignment]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        count = len(frames)
        batch = torch.from_numpy(frames)
        if self.device.type == "cuda" and count < self.batch_size:
            # Same shape every call: the same GPU kernels, so a frame's result never depends
            # on how many frames shared its batch (output identical for any rank count).
            pad = batch[-1:].expand(self.batch_size - count, *batch.shape[1:])
            batch = torch.cat([batch, pad])
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            y = self._forward(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ModelError(f"the model returned {got} for input {tuple(x.shape)}: a frame model must keep the shape")
            out = y[:count].clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
            return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.model(x)
        try:
            return self.model(x)
        except Exception as err:  # Inductor fails in many ways (no C++ compiler, an unsupported op)
            log.warning("torch.compile failed (%s); scoring eagerly instead", str(err).strip().splitlines()[0][:200])
            self.model, self.compiled = self.eager, False
            return self.model(x)


def build_scorer(cfg: DictConfig, local_rank: int, ranks_on_node: int) -> Scorer:
    """The scorer ``cfg`` asks for (``model``, ``device``, ``threads``, ``batch_size``,
    ``compile``), for the ``local_rank``-th of ``ranks_on_node`` ranks on this node."""
    device = pick_device(cfg.device, local_rank)
    if device.type == "cpu":
        set_threads(cfg.threads, ranks_on_node)
    try:
        model = instantiate(cfg.model)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MpistyleError):
            raise cause from None
        reason = (str(cause or err).strip().splitlines() or [type(cause or err).__name__])[0]
        raise ConfigError(f"cannot build the model {cfg.model.get('_target_')}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{cfg.model._target_} returned a {type(model).__name__}, not a torch.nn.Module")
    return Scorer(model, device, cfg.batch_size or default_batch_size(device), cfg.compile)
