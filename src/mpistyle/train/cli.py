"""The ``mpistyle-train`` command: like ``mpistyle``'s CLI (one run directory agreed by every
rank, Hydra config, one line and an exit code per error), calling :func:`loop.run`."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..cli import exit_on_error, start
from ..parallel import RankContext
from . import config as train_config

_ctx: RankContext | None = None


def main() -> None:
    global _ctx
    _ctx = start("train", train_config.register)
    _hydra_main()


@hydra.main(config_path="pkg://mpistyle.configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    assert _ctx is not None
    run_dir = Path(cfg.run_dir)
    with exit_on_error(_ctx, run_dir):
        from .loop import run  # after logging is set up: importing torch takes a moment

        run(cfg, _ctx)
