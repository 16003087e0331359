from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from azurite import Azurite, AzuriteUnavailable
from mpistyle import config
from mpistyle.sample import make_video
from slurm_cluster import SlurmCluster, SlurmUnavailable
from slurm_nodes import SlurmNodes

TESTS = Path(__file__).parent
config.register()

# OpenMPI refuses to run as root without these; more ranks than cores needs oversubscription.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every job of the suite keeps its compiled kernels (mpistyle's default reads
    TORCHINDUCTOR_CACHE_DIR), not the user's ~/.cache: a shape is compiled once, then reused."""
    path = tmp_path_factory.mktemp("torch-compile")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def video(tmp_path: Path) -> Callable[..., Path]:
    """Make a small real video in tmp_path: video(name="in.mp4", frames=24, width=64, ...)."""

    def make(name: str = "in.mp4", **kwargs: Any) -> Path:
        return make_video(tmp_path / name, **kwargs)

    return make


def service_missing(what: str, err: Exception) -> None:
    """Skip when a real service cannot run here, unless the run requires it (scripts/test.sh)."""
    if os.environ.get("MPISTYLE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} must run here but cannot start: {err}")
    pytest.skip(f"{what} cannot be started on this machine: {err}")


Service = TypeVar("Service", SlurmCluster, Azurite)


@contextmanager
def served(service: Service, what: str) -> Iterator[Service]:
    """A real service, started, and stopped after; one that cannot start here is stopped
    (whatever of it did start) and skipped, or fails the run (service_missing)."""
    try:
        service.start()
    except (SlurmUnavailable, AzuriteUnavailable) as err:
        service.stop()
        service_missing(what, err)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with served(SlurmCluster(tmp_path_factory.mktemp("slurm")), "Slurm") as service:
        yield service


@pytest.fixture(scope="session")
def slurm_nodes_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmNodes]:
    """Four compute nodes, each in its own network namespace (tests/slurm_nodes.py): a job on
    three of them still has three when one is lost."""
    with served(SlurmNodes(tmp_path_factory.mktemp("slurm-nodes"), count=4), "a Slurm cluster of network namespaces") as service:
        yield service


@pytest.fixture
def nodes(slurm_nodes_cluster: SlurmNodes) -> Iterator[SlurmNodes]:
    """The multi-node cluster, every node idle again after the test (lost ones started again)."""
    yield slurm_nodes_cluster
    slurm_nodes_cluster.heal()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with served(Azurite(tmp_path_factory.mktemp("azurite")), "Azurite") as service:
        yield service


@pytest.fixture(scope="session")
def azurite_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """The emulator's queue service (Event Grid's deliveries for intake=queue)."""
    with served(Azurite(tmp_path_factory.mktemp("azurite-queue"), service="queue"), "Azurite's queue service") as service:
        yield service


def make_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def cfg() -> Callable[..., DictConfig]:
    return lambda *overrides: make_cfg(list(overrides))


def mpistyle_command(*args: str, ranks: int | None = None) -> list[str]:
    """The real program: `python -m mpistyle ...`, under `mpirun -n ranks` when ranks is given."""
    command = [sys.executable, "-m", "mpistyle", *args]
    if ranks is None:
        return command
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun not found: install Debian's openmpi-bin (scripts/setup.sh does)")
    return [mpirun, "-n", str(ranks), *command]


def run_mpistyle(
    *args: str, ranks: int | None = None, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(
        mpistyle_command(*args, ranks=ranks), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
