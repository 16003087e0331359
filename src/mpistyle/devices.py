"""Which device a rank computes on, at which precision, on which CPUs and with how many threads:
shared by scoring and training. No MPI: what the node's other ranks have is passed in."""
from __future__ import annotations

import logging
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(requested: object) -> None:
    """Refuse a ``device=`` setting that names no device (before anything is loaded)."""
    if not _DEVICE.match(str(requested)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{requested}'")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` and ``cuda`` give each rank on a node its own GPU: ``cuda:<local rank mod GPUs>``."""
    import torch  # here, not at the top: the CLI checks its config before torch is loaded

    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if requested == "cuda":
            raise ConfigError("device=cuda but this node has no usable CUDA GPU (use device=auto or cpu)")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested} but this node has no usable CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={requested} but this node has {torch.cuda.device_count()} GPU(s)")
    return device


def cpu_share(local_rank: int, affinities: Sequence[frozenset[int]], launcher: frozenset[int]) -> frozenset[int]:
    """The CPUs the ``local_rank``-th of a node's ranks should run on, given every local rank's
    CPU affinity and the launcher's (the CPUs the job was given on this node).

    Ranks already bound to disjoint CPUs that together cover every CPU the job may use keep
    their own. Otherwise some cores would idle or be shared (``mpirun -n 2`` binds each rank to
    one core, ``-n 3`` or more binds to a socket, a plain start leaves every rank the whole
    node), so the CPUs are dealt out again: equal contiguous runs, one per rank; with more ranks
    than CPUs, a CPU each in turn.
    """
    bound = frozenset().union(*affinities)
    usable = bound | launcher
    disjoint = sum(len(cpus) for cpus in affinities) == len(bound)
    if disjoint and bound == usable:
        return affinities[local_rank]
    cpus = sorted(usable)
    ranks = len(affinities)
    if ranks >= len(cpus):
        return frozenset({cpus[local_rank % len(cpus)]})
    first, extra = divmod(len(cpus), ranks)
    start = local_rank * first + min(local_rank, extra)
    return frozenset(cpus[start : start + first + (local_rank < extra)])


def launcher_cpus() -> frozenset[int]:
    """The CPUs this process's parent (mpirun, orted, slurmstepd or a shell) may run on: what
    the job was given here, wider than this rank's own when the launcher bound it to a core."""
    own = frozenset(os.sched_getaffinity(0))
    try:
        status = Path(f"/proc/{os.getppid()}/status").read_text()
    except OSError:
        return own
    for line in status.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return own | _cpu_list(line.split(":", 1)[1])
    return own


def _cpu_list(text: str) -> frozenset[int]:
    """``0-3,8,10-11`` -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def set_threads(threads: int | None, cpus: frozenset[int], gpu: bool = False) -> int:
    """Torch CPU threads for this rank. Unless ``threads`` is given, the rank moves onto its
    share of the node's CPUs (:func:`cpu_share`) and takes a thread for each; the decoder, which
    sizes its thread pool from the CPUs the process may use, follows.

    A rank whose model runs on a GPU (``gpu``) keeps its share for the decoder and encoder and
    takes one torch thread: torch's CPU work is then a few copies, and a pool of idle torch
    threads spinning after each one starved x264 (measured on a 16-core H200 node: the encoder
    ran at 12 frames/s in the job against 36 alone)."""
    import torch

    if threads is None:
        if cpus != frozenset(os.sched_getaffinity(0)):
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as err:  # a cpuset narrower than the launcher's mask: keep what we have
                log.info(
                    "cannot move onto CPUs %s (%s); staying on %s", sorted(cpus), err.strerror, sorted(os.sched_getaffinity(0))
                )
        threads = 1 if gpu else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere bf16 is emulated: slower
    than fp32."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def native_fp16(device: torch.device) -> bool:
    """Every CUDA GPU; a CPU with AVX-512 FP16 or AMX FP16 (x86) or half-precision arithmetic (Arm)."""
    return device.type == "cuda" or bool(_cpu_flags() & {"avx512_fp16", "amx_fp16", "asimdhp"})


def device_fingerprint(device: torch.device) -> str:
    """What compiled kernels for ``device`` depend on: a GPU's model and compute capability, a
    CPU's architecture and instruction-set flags."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{device.type} {platform.machine()} {' '.join(sorted(_cpu_flags()))}"


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where ``device`` has it natively (:func:`native_bf16`), else fp32."""
    if requested != "auto":
        native = {"bf16": native_bf16, "fp16": native_fp16}.get(requested)
        if native and not native(device):
            log.warning("precision=%s on %s, which has no native %s: emulated, slower than fp32", requested, device, requested)
        return requested
    return "bf16" if native_bf16(device) else "fp32"
