"""What a training run leaves in its run directory (rank 0 only writes these):

  checkpoint.pt    resumable state (net, optimiser, step, RNG states, config)
  losses.jsonl     one line per logged step: content, style, tv, total, throughput
  samples/         step_NNNNNN.png: the sample image beside its restyled version
  <style>.pth      the trained net's state dict (unless ``output`` puts it elsewhere)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OutputError
from ..files import writable_dir, write_atomic
from ..report import write_png
from .checkpoint import CHECKPOINT_NAME

log = logging.getLogger(__name__)


class RunFiles:
    def __init__(self, run_dir: Path, output: Path) -> None:
        self.run_dir = run_dir
        self.output = output
        self.checkpoint = run_dir / CHECKPOINT_NAME
        self.losses = run_dir / "losses.jsonl"
        self.samples = run_dir / "samples"

    def prepare(self) -> None:
        """Create the run directory and check every location before any step is trained."""
        writable_dir(self.run_dir, "run directory")
        writable_dir(self.samples, "samples folder")
        # Not created: a mistyped output folder should stop the run, not collect the model.
        writable_dir(self.output.parent, "output's folder", create=False)

    def keep_losses_up_to(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old loss lines."""
        if not self.losses.exists():
            return
        lines = self.losses.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            # Whole or not at all: a kill here must not cost the lines before the checkpoint.
            write_atomic(self.losses, "".join(kept).encode())

    def append_losses(self, record: dict[str, Any]) -> None:
        try:
            with self.losses.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise OutputError(f"cannot write {self.losses}: {err.strerror}") from None

    def write_sample(self, step: int, content: torch.Tensor, styled: torch.Tensor) -> Path:
        """``content`` and ``styled``: ``(1, 3, H, W)`` RGB 0-255, side by side in one PNG."""
        pair = torch.cat([content, styled], dim=3)[0].clamp(0, 255).round().to(torch.uint8)
        path = self.samples / f"step_{step:06d}.png"
        write_png(path, np.ascontiguousarray(pair.permute(1, 2, 0).cpu().numpy()))
        return path
