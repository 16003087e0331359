"""Training state on disk: the resumable checkpoint (net, optimiser, step, RNG states, config)
and the final net-only state dict that ``model=transformer_net`` and pytorch/examples load.
Both are written under a temporary name and renamed, so a kill mid-write leaves the last good
file in place.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError
from ..files import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def rng_state() -> dict[str, Any]:
    # Tensors and plain numbers only, so the file loads with torch.load(weights_only=True).
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, saved["position"], saved["has_gauss"], saved["gauss"]))


def _cpu(value: Any) -> Any:
    """A copy with every tensor on the CPU: the file then loads on machines without GPUs."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(item) for item in value)
    return value


def _atomic_save(obj: Any, path: Path) -> None:
    # Serialised in memory first: torch.save to a file reports a full disk as a RuntimeError
    # from its zip writer, while write_atomic turns a failed write into one OutputError.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    # Durable: a requeued job must not find a checkpoint whose bytes never reached the NFS server.
    write_atomic(path, buffer.getvalue(), durable=True)


def save_checkpoint(
    path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
) -> None:
    _atomic_save(
        {
            "format": FORMAT,
            "step": step,
            "model": _cpu(model.state_dict()),
            "optimizer": _cpu(optimizer.state_dict()),
            "rng": rng_state(),
            "config": config,
        },
        path,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ModelError(
            f"cannot read the training checkpoint {path} ({type(err).__name__}): delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{path} is not an mpistyle-train checkpoint: delete it or use another run_dir")
    return state


def save_state_dict(path: Path, model: torch.nn.Module) -> None:
    """The net alone, as ``torch.save(model.state_dict())``: what pytorch/examples saves and loads."""
    _atomic_save(_cpu(model.state_dict()), path)
