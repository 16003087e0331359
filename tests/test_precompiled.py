from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpistyle.devices import launcher_cpus
from mpistyle.model.loading import load_multistyle
from mpistyle.precompiled import Precompiled, _on_the_nodes_cpus, _wrapper_beside_kernels, package_key
from mpistyle.scoring import Scorer

CPU = torch.device("cpu")


def test_the_package_key_follows_what_shapes_the_kernels_and_not_the_weights() -> None:
    model = load_multistyle(style=19)
    key = package_key(model, (1, 3, 64, 64), torch.bfloat16, CPU)
    assert package_key(load_multistyle(style=19), (1, 3, 64, 64), torch.bfloat16, CPU) == key
    assert package_key(load_multistyle(style=5), (1, 3, 64, 64), torch.bfloat16, CPU) == key  # weights
    assert package_key(model, (1, 3, 64, 96), torch.bfloat16, CPU) != key
    assert package_key(model, (2, 3, 64, 64), torch.bfloat16, CPU) != key
    assert package_key(model, (1, 3, 64, 64), None, CPU) != key
    model.contract[1].stride = 1  # a module's setting changes the graph
    assert package_key(model, (1, 3, 64, 64), torch.bfloat16, CPU) != key
    # So does a function held as a setting.
    gelu, relu = (Activated(act) for act in (torch.nn.functional.gelu, torch.nn.functional.relu))
    assert package_key(gelu, (1, 3, 8, 8), None, CPU) != package_key(relu, (1, 3, 8, 8), None, CPU)
    assert package_key(gelu, (1, 3, 8, 8), None, CPU) == package_key(Activated(torch.nn.functional.gelu), (1, 3, 8, 8), None, CPU)


class Activated(nn.Module):
    def __init__(self, act: object) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)  # type: ignore[operator,no-any-return]


class DataDependent(nn.Module):
    """A branch on the frame's content: torch.export refuses it, torch.compile breaks the graph there."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 2.0:
            return x
        return x * self.gain


def test_a_model_that_does_not_export_is_compiled_in_the_process_and_the_refusal_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    frame = np.full((1, 16, 16, 3), 200, np.uint8)
    with caplog.at_level(logging.INFO, logger="mpistyle.scoring"):
        for attempt in range(2):
            scorer = Scorer(DataDependent(), CPU, 1, "fp32", compile_model=True)
            how = scorer.prepare(16, 16)
            assert how.startswith("compiled in "), how
            assert np.abs(scorer(frame).astype(int) - 100).max() <= 1
            refused = list((tmp_path / "aot").glob("*.refused"))
            assert len(refused) == 1 and "does not export" in refused[0].read_text()
            notes = [r.getMessage() for r in caplog.records if "not compiled ahead of time" in r.getMessage()]
            assert len(notes) == attempt + 1
            assert ("recorded in" in notes[-1]) is (attempt == 1)


def test_a_package_is_built_once_loaded_after_and_built_again_when_its_file_is_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid())
    frame = np.random.default_rng(0).integers(0, 256, (1, 16, 24, 3), np.uint8)
    expected = Scorer(model, CPU, 1, "fp32")(frame).astype(int)
    hows = []
    for attempt in range(3):
        scorer = Scorer(model, CPU, 1, "fp32", compile_model=True)
        hows.append(scorer.prepare(16, 24))
        assert np.abs(scorer(frame).astype(int) - expected).max() <= 1
        (package,) = (tmp_path / "aot").glob("*.pt2")
        if attempt == 1:
            package.write_bytes(package.read_bytes()[:1000])  # cut short, as a full disk leaves it
    assert [how.split(", ")[1].split(" in ")[0] for how in hows] == ["built", "loaded", "built"]
    assert any("building it again" in r.getMessage() for r in caplog.records)
    # A package that wants tensors the model lacks (another model's, under this one's name) is
    # refused without a rebuild: the model is compiled in the process instead.
    renamed = nn.Sequential(OrderedDict(conv=model[0], squash=model[1]))
    shutil.copy(package, package.with_name(f"{package_key(renamed, (1, 3, 16, 24), None, CPU)}.pt2"))
    scorer = Scorer(renamed, CPU, 1, "fp32", compile_model=True)
    with caplog.at_level(logging.INFO, logger="mpistyle.scoring"):
        assert scorer.prepare(16, 24).startswith("compiled in ")
    assert np.abs(scorer(frame).astype(int) - expected).max() <= 1
    assert any("wants tensors the model lacks" in r.getMessage() for r in caplog.records)


def test_the_package_key_is_the_same_in_every_process_whatever_it_imported() -> None:
    # Ranks import different parts of mpistyle before loading the model (the root plans, joins,
    # reports): the key must not depend on that, or every rank would build its own package.
    script = (
        "import sys, torch; {extra}\n"
        "from mpistyle.model.loading import load_multistyle\n"
        "from mpistyle.precompiled import package_key\n"
        "print(package_key(load_multistyle(), (1, 3, 64, 64), torch.bfloat16, torch.device('cpu')))\n"
    )
    keys = {
        subprocess.run([sys.executable, "-c", script.format(extra=extra)], capture_output=True, text=True, check=True).stdout
        for extra in ("pass", "import mpistyle.pipeline, mpistyle.watch.watcher, mpistyle.train.loop")
    }
    assert len(keys) == 1 and len(next(iter(keys)).strip()) == 32


def test_a_package_that_fails_when_run_is_given_up_for_the_in_process_compile_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a node whose GPU driver cannot run kernels built for its GPU model elsewhere.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sigmoid())
    frame = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), np.uint8)
    expected = Scorer(model, CPU, 1, "fp32")(frame).astype(int)

    def fails(self: Precompiled, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(Precompiled, "__call__", fails)
    scorer = Scorer(model, CPU, 1, "fp32", compile_model=True)
    assert scorer.prepare(8, 8).startswith("compiled in ")
    assert scorer.kernels == "jit" and np.abs(scorer(frame).astype(int) - expected).max() <= 1
    (refused,) = (tmp_path / "aot").glob("*.refused")
    assert "failed when run" in refused.read_text() and "no kernel image" in refused.read_text()
    # Later jobs go straight to the in-process compile.
    assert Scorer(model, CPU, 1, "fp32", compile_model=True).prepare(8, 8).startswith("compiled in ")


class _Object:
    """Stands for one of Inductor's C++ builds: its target names what it builds."""

    def __init__(self, target: str, build: Callable[[], None]) -> None:
        self.target, self.build = target, build

    def get_target_file_path(self) -> str:
        return self.target


def test_a_packages_wrapper_compiles_beside_its_kernels_and_its_error_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.cpp_builder import CppBuilder

    monkeypatch.setattr(CppBuilder, "build", lambda builder: builder.build())
    wrapper_started, built = threading.Event(), []

    def wrapper() -> None:
        wrapper_started.set()
        time.sleep(0.2)
        built.append("wrapper")

    def kernels() -> None:
        assert wrapper_started.wait(30)  # both at once: the wrapper still compiling
        built.append("kernels")

    with _wrapper_beside_kernels():
        CppBuilder.build(_Object("/c/x.wrapper.o", wrapper))  # type: ignore[arg-type]
        CppBuilder.build(_Object("/c/x.kernel.o", kernels))  # type: ignore[arg-type]
        assert built == ["kernels", "wrapper"]  # the wrapper awaited before the link
        CppBuilder.build(_Object("/c/x.wrapper.so", lambda: built.append("link")))  # type: ignore[arg-type]
    assert built == ["kernels", "wrapper", "link"]

    def wrapper_fails() -> None:
        raise RuntimeError("cc1plus: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"), _wrapper_beside_kernels():
        CppBuilder.build(_Object("/c/y.wrapper.o", wrapper_fails))  # type: ignore[arg-type]
        CppBuilder.build(_Object("/c/y.kernel.o", lambda: None))  # type: ignore[arg-type]
    assert CppBuilder.build is not None and "build_beside" not in CppBuilder.build.__qualname__


def test_a_build_runs_on_the_nodes_cpus_and_the_rank_goes_back_to_its_own() -> None:
    own = os.sched_getaffinity(0)
    if len(launcher_cpus()) < 2:
        pytest.skip("one CPU here")
    os.sched_setaffinity(0, {min(own)})
    try:
        with _on_the_nodes_cpus():
            assert os.sched_getaffinity(0) == launcher_cpus()
        assert os.sched_getaffinity(0) == {min(own)}
    finally:
        os.sched_setaffinity(0, own)
