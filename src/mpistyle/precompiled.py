"""A frame model compiled ahead of time (AOTInductor) for one input shape, precision and device,
kept in the compile cache as a package that later jobs load in milliseconds.

``torch.compile`` compiles in the process: even from a warm cache each rank imports the compiler,
traces the model and probes the CPU (4-5 s on 2 cores). A package holds the compiled kernels
alone; loading it needs none of that. The package holds no weights: they are handed to it from
the live model at load, so one package serves every style, painting and checkpoint of an
architecture, and stale weights cannot be used.

A package is named by a key over everything that shapes its kernels: torch's version, the
device (CPU flags, GPU model), the precision, the input shape, and the model's structure (its
modules' classes and settings, its tensors' names, shapes and dtypes, and the source files of
the packages its classes come from).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devices import device_fingerprint, launcher_cpus
from .errors import first_line

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when what goes into a package changes

# How Inductor builds a package (changing one that changes the kernels wants a new _FORMAT).
_INDUCTOR: dict[str, Any] = {
    # Kernels read the thread count when they run: one package for every `threads`.
    "cpp.dynamic_threads": True,
    # Weights come from the live model at load (see Precompiled).
    "aot_inductor.package_constants_in_so": False,
    # The wrapper only calls the kernels: at -O0 it compiles in 4 s instead of 6
    # (640x360, 2 cores) and runs as fast (99 ms a frame either way).
    "aot_inductor.compile_wrapper_opt_level": "O0",
    # Trust the CPU's flags for its vector instructions instead of first building
    # a test library of ATen's vector code for each (AVX-512, AVX2): three builds of
    # 2.5 s, a third of a cold build at 640x360 on 2 cores, for the same kernels
    # (the outputs are identical). The finer checks (bf16, VNNI, AMX) still run; a
    # compiler that cannot target the CPU fails the build, and the model is
    # compiled in the process instead.
    "cpp.vec_isa_ok": True,
}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Version numbers stand for these packages' sources (too big to read at each start).
_VERSIONED = {"torch": torch.__version__, "torchvision": _version("torchvision")}


class CannotPrecompile(Exception):
    """The model cannot be compiled ahead of time (it does not export, or the build failed)."""


class Precompiled:
    """A loaded package: ``(x,) -> y`` with the model's own tensors as its weights."""

    def __init__(self, package: Path, model: nn.Module, device: torch.device) -> None:
        index = -1 if device.type == "cpu" else (device.index or 0)
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, index)
        tensors = _tensors(_Autocast(model, None))
        # The loader keeps pointers to these tensors (the model outlives it): no copy, and a
        # buffer the model changes in place is seen.
        self._model = model
        wanted = self._loader.get_constant_fqns()
        missing = [name for name in wanted if name not in tensors]
        if missing:  # built for another model under the same key: building again would not help
            raise CannotPrecompile(f"{package} wants tensors the model lacks: {', '.join(missing[:3])}")
        self._loader.load_constants({name: tensors[name] for name in wanted}, False, True, True, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self._loader.boxed_run([x.contiguous()])[0]
        return result


def load_or_build(model: nn.Module, example: torch.Tensor, dtype: torch.dtype | None, cache: Path) -> tuple[Precompiled, str]:
    """The model's package for ``example``'s shape at ``dtype`` (autocast; None: fp32) from
    ``cache``, built there first if it is not; with a few words on which, for the log.

    Ranks that build the same package at once each write their own file and rename it into
    place: the last one wins, and every one is whole. An export failure is recorded beside the
    package so later jobs skip the attempt. Raises :class:`CannotPrecompile`.
    """
    folder = cache / "aot"
    key = package_key(model, tuple(example.shape), dtype, example.device)
    package, refused = folder / f"{key}.pt2", folder / f"{key}.refused"
    if refused.exists():
        raise CannotPrecompile(f"{refused.read_text().strip()} (recorded in {refused})")
    started = time.perf_counter()
    if package.exists():
        try:
            loaded = Precompiled(package, model, example.device)
            return loaded, f"loaded in {time.perf_counter() - started:.1f} s (from the compile cache {cache})"
        except CannotPrecompile:
            raise
        except Exception as err:  # a truncated or foreign file: built again below, in its place
            log.warning("cannot load %s (%s): building it again", package, first_line(err)[:200])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a")
    except OSError as err:
        raise CannotPrecompile(f"cannot make {folder}: {err.strerror}") from None
    with lock:
        # Ranks of a node build one at a time: the others wait, then load what the first built.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not package.exists() or _stale(package, started):
            _build(model, example, dtype, package, refused)
    try:
        built = Precompiled(package, model, example.device)
    except CannotPrecompile:
        raise
    except Exception as err:  # every later job would build it again for nothing: say so once
        reason = f"the package just built does not load: {first_line(err)[:300]}"
        _write_quietly(refused, reason + "\n")
        raise CannotPrecompile(reason) from None
    return built, f"built in {time.perf_counter() - started:.1f} s (new, kept in the compile cache {cache})"


def record_failure(model: nn.Module, example: torch.Tensor, dtype: torch.dtype | None, cache: Path, why: str) -> None:
    """Record that the model's package failed when run, so later jobs compile in the process."""
    key = package_key(model, tuple(example.shape), dtype, example.device)
    _write_quietly(cache / "aot" / f"{key}.refused", f"the package failed when run: {why}\n")


def _stale(package: Path, started: float) -> bool:
    """Whether ``package`` is the damaged file found at the start (not one another rank built
    while this one waited for the lock)."""
    return package.stat().st_mtime < time.time() - (time.perf_counter() - started)


def _build(model: nn.Module, example: torch.Tensor, dtype: torch.dtype | None, package: Path, refused: Path) -> None:
    import torch._inductor
    import torch.export

    with warnings.catch_warnings():
        # torch's own deprecation notices from inside export are not the user's to act on.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.inference_mode():
                exported = torch.export.export(_Autocast(model, dtype), (example.contiguous(),))
        except Exception as err:  # export refuses data-dependent code in many ways
            reason = f"the model does not export: {first_line(err)[:300]}"
            _write_quietly(refused, reason + "\n")
            raise CannotPrecompile(reason) from None
        # Ranks on several nodes may build at once into a shared folder: a name each of their own.
        partial = package.with_name(f"{package.stem}.{socket.gethostname()}-{os.getpid()}.partial.pt2")
        try:
            with _on_the_nodes_cpus(), _wrapper_beside_kernels():
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=_INDUCTOR)
            os.replace(partial, package)
        except Exception as err:  # no C++ compiler, a full disk, an unsupported op
            raise CannotPrecompile(f"building failed: {first_line(err)[:300]}") from None
        finally:
            partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _on_the_nodes_cpus() -> Iterator[None]:
    """Run the build (and the compilers it starts) on every CPU the job has on this node, not
    only this rank's share: the node's other ranks are waiting for this package."""
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, launcher_cpus())
    except OSError:  # a cpuset narrower than the launcher's mask: build where we are
        pass
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


@contextlib.contextmanager
def _wrapper_beside_kernels() -> Iterator[None]:
    """Compile the package's wrapper and its kernels at once (Inductor compiles one, then the
    other: 4 s and 2.5 s of g++ at 640x360). The wrapper is compiled in a thread of its own and
    waited for before anything else is built (the link); a torch that names its objects
    otherwise builds them one after the other, as before."""
    from torch._inductor.cpp_builder import CppBuilder

    build = CppBuilder.build
    pending: list[Future[None]] = []

    with ThreadPoolExecutor(1, thread_name_prefix="mpistyle-build") as pool:

        def build_beside(builder: CppBuilder) -> None:
            if not pending and builder.get_target_file_path().endswith(".wrapper.o"):
                pending.append(pool.submit(build, builder))
                return
            try:
                build(builder)
            finally:
                while pending:
                    pending.pop().result()  # the wrapper's compile error, if it had one

        CppBuilder.build = build_beside  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            CppBuilder.build = build  # type: ignore[method-assign]
            while pending:  # the build failed before the kernels: let the wrapper's compile end
                pending.pop().exception()


class _Autocast(nn.Module):
    """The model run under autocast at ``dtype`` (None: as it is), as the package records it."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            result: torch.Tensor = self.model(x)
        return result


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    return {name: tensor.detach() for name, tensor in named.items()}


def package_key(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype | None, device: torch.device) -> str:
    """What the package's kernels depend on, hashed (see the module's docstring)."""
    what: dict[str, Any] = {
        "format": _FORMAT,
        "versions": _VERSIONED,
        "python": sys.version_info[:2],
        "device": device_fingerprint(device),
        "dtype": str(dtype),
        "shape": shape,
        "modules": [(name, _qualname(type(module)), _settings(module)) for name, module in model.named_modules()],
        "tensors": [(name, tuple(t.shape), str(t.dtype)) for name, t in sorted(_tensors(model).items())],
        "sources": _sources(model),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # training, _parameters, _buffers, the hooks


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's own settings (stride, eps, flags, an activation function held as an
    attribute): they shape the graph as the code does. Tensors and submodules are keyed apart."""
    return {
        key: _describe(value)
        for key, value in vars(module).items()
        if key not in _MODULE_INTERNALS and not isinstance(value, torch.Tensor | nn.Module)
    }


def _describe(value: Any) -> Any:
    """A value as the key holds it: the same in every process (never a memory address)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_describe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _describe(item) for key, item in value.items()}
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # an array: its layout, not its values
        return f"{type(value).__qualname__}{tuple(value.shape)}{value.dtype}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def _sources(model: nn.Module) -> dict[str, str]:
    """A hash of every Python source file of each package the model's classes come from (the
    forward may call helpers anywhere in its package; all of them, not only those imported so
    far, so every process and rank gets the same key), torch's aside: its version stands for it."""
    digests: dict[str, str] = {}
    for top in sorted({type(module).__module__.split(".")[0] for module in model.modules()} - set(_VERSIONED)):
        loaded = sys.modules.get(top)
        folders = [Path(folder) for folder in getattr(loaded, "__path__", [])]
        # Named relative to the package, so a copy installed elsewhere (another node) keys alike.
        files = [(f"{top}/{path.relative_to(folder)}", path) for folder in folders for path in folder.rglob("*.py")]
        if not folders:
            source = getattr(loaded, "__file__", None)
            if source is None:
                raise CannotPrecompile(f"the model's classes come from {top}, which has no source file")
            files = [(top, Path(source))]
        for name, path in sorted(files):
            try:
                digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
    return digests


def _write_quietly(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        pass
