"""The ``mpistyle-train`` command: like ``mpistyle``'s CLI (one run directory agreed by every
rank, Hydra config, one line and an exit code per error), calling :func:`loop.run`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..cli import Launch, exit_on_error, run_hydra, start
from . import config as train_config


def main() -> None:
    run_hydra(start("train", train_config.register), "train", _train)


def _train(cfg: DictConfig, launch: Launch) -> None:
    # configs/train.yaml names the run directory run_dir (Hydra makes it, as hydra.run.dir).
    with exit_on_error(launch.ctx, Path(cfg.run_dir)):
        from .loop import run  # after logging is set up: importing torch takes a moment

        run(cfg, launch.ctx)
