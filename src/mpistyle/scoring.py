"""Batches of frames in, batches of frames out, on one device. No MPI, no files: the model is
built from its config node, on the device this rank was given."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from .devices import pick_device, pick_precision, set_threads
from .errors import ConfigError, ModelError, MpistyleError, first_line
from .precompiled import CannotPrecompile, Precompiled, load_or_build, record_failure


def default_batch_size(device: torch.device) -> int:
    """Batches feed a GPU; on a CPU one frame at a time was fastest (bigger batches mostly add
    page faults for the larger activations: 176 vs 196 ms/frame at 640x360 on 2 cores). On a
    GPU this is the most: :meth:`Scorer.prepare` takes fewer where the frames are too big."""
    return GPU_BATCH_MOST if device.type == "cuda" else 1


GPU_BATCH_MOST = 8
# The share of a GPU's memory one rank's batch may take: a fifth, so that four ranks can share a
# GPU with room left for each process's CUDA context, the model and the allocator's rounding. It
# is a share of the GPU's whole memory, not of what is free when the rank starts: that would
# depend on the other ranks, and the batch size changes a frame's rounding (the output must be
# the same file for any rank count).
GPU_MEMORY_SHARE = 0.2


def fitting_batch(gpu_bytes: int, frame_bytes: int, most: int = GPU_BATCH_MOST) -> int:
    """Frames per batch on a GPU of ``gpu_bytes`` where each frame of a batch adds
    ``frame_bytes``: as many as fit in :data:`GPU_MEMORY_SHARE` of it, at least 1 and at most
    ``most``."""
    return max(1, min(most, int(gpu_bytes * GPU_MEMORY_SHARE) // max(frame_bytes, 1)))


log = logging.getLogger(__name__)


_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# compile=auto compiles when a job's frames hold at least this many pixels in all: compiling
# costs about 2.5 s from a warm cache and 15-35 s cold (640x360 on 2 CPU cores) and saves about
# half the model's time from then on, so below this (about 7 s of 640x360 video) eager is as fast.
# On a GPU (an H200 at 1080p, bf16): compiling in the process took 29 s cold and took the
# scorer from 61 to 88 frames/s, 5 ms a frame, so a cold compile pays after about 5,800 frames
# of 1080p (12 gigapixels, 3 min at 30 fps) on one rank. The rule counts the job's pixels, never
# the ranks: compiled kernels round differently, and the output must not depend on the rank count.
_COMPILE_AUTO_PIXELS = {"cpu": 40_000_000, "cuda": 12_000_000_000}


class Scorer:
    """Applies a frame model to uint8 RGB frames ``(n, H, W, 3)`` and returns the same layout,
    at ``precision`` (fp32, bf16 or fp16: autocast, so norms and the output stay fp32), compiled
    when ``compile_model`` (see :meth:`prepare`), ``batch_size`` frames a call (None: 1 on a
    CPU; on a GPU as many as fit, at most 8, decided by :meth:`prepare`)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int | None,
        precision: str = "fp32",
        compile_model: bool = False,
        threads: int | None = None,
    ) -> None:
        self.device = device
        self.threads = threads or torch.get_num_threads()
        self.batch_size = batch_size or default_batch_size(device)
        self._fit_batch = batch_size is None and device.type == "cuda"
        self.frame_bytes: int | None = None  # what a frame adds to a batch on the GPU, once measured
        self.precision = precision
        self.dtype = getattr(torch, _DTYPES[precision]) if precision in _DTYPES else None
        self.eager = model.to(device).eval()
        # Compiled kernels round differently from eager ones, and with the thread count: the
        # output is the same file for any rank count at the same threads per rank (docs/guarantees.md).
        self.compiled = compile_model
        self.model: nn.Module = self.eager
        self._package: Precompiled | None = None  # the model compiled ahead of time, once prepared
        self._prepared = False

    def prepare(self, height: int, width: int) -> str:
        """Compile the model for frames of this size when asked to, and run it once on a blank
        frame, so it is built (or given up for eager) before the first real frame. Returns what
        happened, for the log.

        Compiling first tries ahead of time (a package in the compile cache that every later
        job loads in milliseconds); a model that cannot be is compiled in the process
        (``torch.compile``: a few seconds from a warm cache), and one that cannot be either
        runs eagerly."""
        self._prepared = True
        blank = np.zeros((1, height, width, 3), np.uint8)
        if self._fit_batch:
            self._fit_batch = False
            self._size_batch(blank)
        if not self.compiled:
            self(blank)
            return "eager"
        how = self._compile_ahead(height, width)
        if how is not None:
            try:
                self(blank)
            except MpistyleError:
                raise  # no memory for the batch: the package is not at fault
            except Exception as err:  # built for this machine type, yet it does not run here (a driver)
                log.warning("the compiled package failed when run (%s): compiling in the process instead", first_line(err)[:200])
                self._drop_package(height, width, first_line(err)[:200])
                how = None
        if how is None:
            how = self._compile_in_process(blank)
        return how if self.compiled else "eager (compiling failed)"

    def _size_batch(self, blank: np.ndarray) -> None:
        """Measure what each frame of this size adds to a batch on the GPU, and batch as many
        as fit. The difference between the peaks of a batch of 2 and of 1 leaves out what is
        paid once (library workspaces, weight copies), which depends on what the process ran
        before, so every rank and every job measures the same."""
        most = self.batch_size
        peaks = []
        for size in (1, 2):
            self.batch_size = size
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self(np.repeat(blank, size, axis=0))
            peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
        self.frame_bytes = max(peaks[1] - peaks[0], 1)
        gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory
        self.batch_size = fitting_batch(gpu_bytes, self.frame_bytes, most)
        log.info(
            "batches of %d frame(s) on %s: a %dx%d frame adds %.0f MiB, of the GPU's %.1f GiB a batch may take %d%%",
            self.batch_size, self.device, blank.shape[2], blank.shape[1], self.frame_bytes / 2**20, gpu_bytes / 2**30,
            GPU_MEMORY_SHARE * 100,
        )

    def use_eager(self) -> None:
        """Score with the eager model from now on (the ranks must agree on their kernels)."""
        self._package, self.model, self.compiled = None, self.eager, False

    def _drop_package(self, height: int, width: int, why: str) -> None:
        example = torch.zeros(self.batch_size, 3, height, width, device=self.device)
        record_failure(self.eager, example, self.dtype, compile_cache(None), why)
        self._package = None

    @property
    def kernels(self) -> str:
        """Which kernels score (their rounding differs): ``aot`` (the package), ``jit``
        (``torch.compile`` in the process) or ``eager``."""
        if self._package is not None:
            return "aot"
        return "jit" if self.compiled else "eager"

    def _compile_ahead(self, height: int, width: int) -> str | None:
        """Load (or build) the model's package for this frame size; None when it cannot be."""
        if any(isinstance(part, torch.jit.ScriptModule) for part in self.eager.modules()):
            return None  # torch.export takes no TorchScript
        if self.device.type != "cpu":
            # Loading a CUDA package crashed the process (a segmentation fault in torch's
            # package loader, torch 2.11+cu130 on an H200: bench/results/gpu-*.json), which no
            # fallback can catch: GPUs compile in the process.
            return None
        try:
            example = torch.zeros(self.batch_size, 3, height, width, device=self.device)
            self._package, how = load_or_build(self.eager, example, self.dtype, compile_cache(None))
        except CannotPrecompile as err:
            log.info("not compiled ahead of time (%s): compiling in the process instead", err)
            return None
        except Exception as err:  # the device refusing the example (out of memory), or a bug of torch's
            log.warning("not compiled ahead of time (%s): compiling in the process instead", first_line(err)[:200])
            return None
        return f"compiled ahead of time, {how}"

    def _compile_in_process(self, blank: np.ndarray) -> str:
        started = time.perf_counter()
        try:
            before = _compile_cache_counts()  # importing the compiler makes the cache folder
            import torch._inductor.config as inductor

            # Kernels that read the thread count when they run, not when compiled: one
            # compile (and one cache entry) serves every rank count and `threads`.
            inductor.cpp.dynamic_threads = True
            self.model = torch.compile(self.eager, dynamic=False)  # type: ignore[assignment]
        except Exception as err:  # its set-up reads the cache folder, which may not be made
            self._give_up_compiling(err)
            return "eager (compiling failed)"
        self(blank)  # compiles (or loads from the cache); gives up for eager if that fails
        hits, misses = (after - earlier for after, earlier in zip(_compile_cache_counts(), before))
        where = "from the compile cache" if hits and not misses else "new, kept in the compile cache"
        return f"compiled in {time.perf_counter() - started:.1f} s ({where} {compile_cache(None)})"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if not self._prepared:
            self.prepare(*frames.shape[1:3])
        count = len(frames)
        batch = torch.from_numpy(frames)
        if (self.device.type == "cuda" or self._package is not None) and count < self.batch_size:
            # Same shape every call: the same GPU kernels, so a frame's result never depends
            # on how many frames shared its batch (output identical for any rank count).
            pad = batch[-1:].expand(self.batch_size - count, *batch.shape[1:])
            batch = torch.cat([batch, pad])
        try:
            return self._score(batch, count)
        except RuntimeError as err:
            if not _out_of_memory(err):
                raise
            log.warning("out of memory on %s: %s", self.device, first_line(err)[:300])
            raise self._no_memory_for(*batch.shape[:3]) from None

    def _score(self, batch: torch.Tensor, count: int) -> np.ndarray:
        """The first ``count`` frames of ``batch`` (uint8, on the host) through the model."""
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            # From pinned memory the copy is a DMA the GPU runs by itself: 1.8 ms for eight 1080p
            # frames there and back against 11.5 ms from ordinary memory (H200). Torch's pinned
            # allocator keeps the blocks and reuses each once its copy is done.
            batch = torch.empty(batch.shape, dtype=torch.uint8, pin_memory=True).copy_(batch)
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            if self._package is not None:
                y = self._package(x)  # autocast is inside it
            else:
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                    y = self._forward(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ModelError(f"the model returned {got} for input {tuple(x.shape)}: a frame model must keep the shape")
            out = y[:count].float().clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)  # never in place: y may be the model's
            out = out.permute(0, 2, 3, 1).contiguous()
            if not on_gpu:
                return out.cpu().numpy()
            host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True).copy_(out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy()  # the array holds the pinned block until the encoder is done with it

    def _no_memory_for(self, batch: int, height: int, width: int) -> ConfigError:
        """The error for a batch the device had no memory for, with what to set instead."""
        where, sharing = ("the GPU", "GPU") if self.device.type == "cuda" else ("this node", "node")
        instead = f"batch_size={batch // 2}" if batch > 1 else f"fewer ranks per {sharing} or a smaller model"
        return ConfigError(
            f"{where} ({self.device}) ran out of memory scoring a batch of {batch} {width}x{height} frame(s); "
            f"other processes on it count too: try {instead}"
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.model(x)
        try:
            return self.model(x)
        except Exception as err:  # Inductor fails in many ways (no C++ compiler, an unsupported op, no cache)
            if _out_of_memory(err):
                raise  # the batch's fault, not the compiler's
            self._give_up_compiling(err)
            return self.model(x)

    def _give_up_compiling(self, err: Exception) -> None:
        log.warning("torch.compile failed (%s); scoring eagerly instead", first_line(err)[:200])
        self.model, self.compiled = self.eager, False


# How an allocation that failed shows besides torch.OutOfMemoryError: the CPU allocator's
# message, and the CUDA libraries' own (cuBLAS, cuDNN, a kernel launch) as plain RuntimeErrors.
_NO_MEMORY = (
    "DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
)


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed, on the GPU or the CPU."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or any(text in str(err) for text in _NO_MEMORY)


def _reason(err: BaseException) -> str:
    """Hydra's message for a target it cannot build, on one line: its lines after a heading that
    ends in a colon are the reason itself (``Error loading 'x.y':`` / ``No module named 'x'``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return "; ".join(lines[1:4] if len(lines) > 1 and lines[0].endswith(":") else lines[:3])


def _compile_cache_counts() -> tuple[int, int]:
    """Inductor's compile cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def build_scorer(cfg: DictConfig, local_rank: int, cpus: frozenset[int], job_pixels: int) -> Scorer:
    """The scorer ``cfg`` asks for (``model``, ``device``, ``precision``, ``threads``,
    ``batch_size``, ``compile``) for the ``local_rank``-th rank on its node, which runs on
    ``cpus``; ``job_pixels`` (every frame's pixels added up) decides ``compile=auto``."""
    device = pick_device(cfg.device, local_rank)
    threads = set_threads(cfg.threads, cpus, gpu=device.type == "cuda")
    try:
        model = instantiate(cfg.model)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MpistyleError):
            raise cause from None
        raise ConfigError(f"cannot build the model {cfg.model.get('_target_')}: {_reason(cause or err)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{cfg.model._target_} returned a {type(model).__name__}, not a torch.nn.Module")
    if any(isinstance(part, torch.jit.ScriptModule) for part in model.modules()):
        # Autocast does not reach inside TorchScript, nor does torch.compile: it runs as saved.
        if cfg.precision not in ("auto", "fp32"):
            raise ConfigError(
                f"precision={cfg.precision} cannot apply to a TorchScript model (it runs at the precision it was "
                "saved with): use precision=auto or fp32"
            )
        precision, compiled = "fp32", cfg.compile is True
    else:
        precision, compiled = pick_precision(cfg.precision, device), wants_compile(cfg.compile, device, job_pixels)
    if compiled:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache(cfg.compile_cache))
    return Scorer(model, device, cfg.batch_size, precision, compiled, threads)


def wants_compile(setting: bool | str, device: torch.device, job_pixels: int) -> bool:
    """``compile``: true, false, or auto (when the job is big enough to pay for compiling)."""
    if setting == "auto":
        return job_pixels >= _COMPILE_AUTO_PIXELS.get(device.type, _COMPILE_AUTO_PIXELS["cuda"])
    return bool(setting)


def compile_cache(setting: str | None) -> Path:
    """Where compiled kernels are kept between jobs: ``compile_cache``, else the environment's
    ``TORCHINDUCTOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpistyle/torch-compile`` (``~/.cache``
    by default: on a cluster, the shared home directory, so every node reuses one compile)."""
    if setting:
        return Path(setting).expanduser().absolute()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser().absolute() / "mpistyle" / "torch-compile"
