"""Run under mpirun by tests/test_train.py: one data-parallel training step on real MPI ranks.

Every rank computes its slice's gradient and averages it with the others (the trainer's own
code); rank 0 then computes the whole global batch's gradient alone and writes both, with every
rank's averaged gradient digest, to OUT/grads.json.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from mpistyle.model.transformer_net import TransformerNet
from mpistyle.parallel import RankContext
from mpistyle.train import config as train_config
from mpistyle.train import loop


def gradient(
    cfg: DictConfig, ctx: RankContext, setup: loop.Setup, average: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    torch.manual_seed(0)
    net = TransformerNet()
    optimizer = torch.optim.Adam(net.parameters())
    local = loop.make_step(cfg, ctx, setup, net, optimizer, torch.device("cpu"))(1)
    losses = loop.average_over_ranks(ctx, list(net.parameters()), local) if average else {}
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double(), losses


def main(out: Path, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    train_config.register()
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    ctx = RankContext.world()
    setup = loop.build_setup(cfg, torch.device("cpu"))
    averaged, losses = gradient(cfg, ctx, setup)
    digests = ctx.gather_all(hashlib.sha256(averaged.numpy().tobytes()).hexdigest())
    if ctx.is_root:
        alone = RankContext(None, 0, 1, 0, 1, ctx.host)
        whole = cfg.copy()
        whole.batch_size = cfg.batch_size * ctx.size
        full, full_losses = gradient(whole, alone, setup)
        # What rank 0's slice alone gives: the difference a missing average would leave.
        own, _ = gradient(cfg, RankContext(None, 0, ctx.size, 0, 1, ctx.host), setup, average=False)
        result = {
            "digests": digests,
            "relative_difference": float((averaged - full).norm() / full.norm()),
            "rank0_alone_difference": float((own - full).norm() / full.norm()),
            "losses": losses,
            "full_losses": full_losses,
        }
        (out / "grads.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
