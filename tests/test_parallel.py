"""RankContext with real OpenMPI at several sizes: what the root gets and what the others get."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mpistyle.parallel import RankContext

from conftest import MPI_ENV, TESTS

pytestmark = pytest.mark.mpi


@pytest.fixture
def ranks_run(tmp_path: Path) -> Callable[..., list[dict]]:
    def run(case: str, ranks: int, *launch: str) -> list[dict]:
        """``rank_probe.py case`` under ``[launch...] mpirun [launch options] -n ranks``."""
        mpirun = shutil.which("mpirun")
        assert mpirun, "mpirun not found: install Debian's openmpi-bin (scripts/setup.sh does)"
        out = tmp_path / f"{case}-{ranks}-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        before = list(launch[: launch.index("mpirun")]) if "mpirun" in launch else []
        options = list(launch[launch.index("mpirun") + 1 :]) if "mpirun" in launch else list(launch)
        done = subprocess.run(
            [*before, mpirun, *options, "-n", str(ranks), sys.executable, str(TESTS / "rank_probe.py"), case, str(out)],
            env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(ranks)]

    return run


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_a_large_result_from_the_root_reaches_every_rank(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    lines = ranks_run("large-from-root", ranks)
    assert [line["rank"] for line in lines] == list(range(ranks))
    assert all(line["result"] == [300_000, 299_999] for line in lines)
    assert sorted(line["local_rank"] for line in lines) == list(range(ranks))  # one node here


@pytest.mark.parametrize("ranks", [1, 3])
def test_root_error_reaches_every_rank(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    lines = ranks_run("from-root-error", ranks)
    assert all(line["result"] == [False, "ModelError", "checkpoint does not fit"] for line in lines)


@pytest.mark.parametrize("ranks", [2, 3])
def test_one_rank_failing_a_check_fails_every_rank_naming_it(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    lines = ranks_run("check-all", ranks)
    failing = ranks - 1
    for line in lines:
        expected = "checkpoint does not fit" if line["rank"] == failing else f"rank {failing}: checkpoint does not fit"
        assert line["result"] == [False, expected]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_progress_and_summaries_reach_the_root(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    lines = ranks_run("progress", ranks)
    root = lines[0]["result"]
    assert root["frames"] == sum(3 * (rank + 1) for rank in range(ranks))
    assert [s["ticks"] for s in root["summaries"]] == [[True] * 3] * ranks
    assert all(line["result"]["summaries"] == [] for line in lines[1:])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_items_are_handed_out_on_demand_each_to_exactly_one_rank(
    ranks_run: Callable[[str, int], list[dict]], ranks: int
) -> None:
    lines = ranks_run("handout", ranks)
    taken = lines[0]["result"]["taken"]
    assert sorted(item for items in taken for item in items) == list(range(40))
    assert all(items == sorted(items) for items in taken)  # in order, to whoever asks next
    assert all(line["result"]["taken"] == [] for line in lines[1:])  # only the root gets them all
    if ranks > 1:  # the slow rank (4x the time per item) did fewer than any other
        assert len(taken[-1]) < min(len(items) for items in taken[:-1])


@pytest.mark.parametrize("ranks", [1, 3])
def test_each_rank_s_notes_reach_the_root_in_order(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    result = ranks_run("notes", ranks)[0]["result"]
    for rank, taken in enumerate(result["taken"]):
        assert [item for source, item in result["noted"] if source == rank] == taken
    assert sorted(item for _, item in result["noted"]) == list(range(30))


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_training_collectives(ranks_run: Callable[[str, int], list[dict]], ranks: int) -> None:
    lines = ranks_run("training", ranks)
    # Each rank its own two items of the global batch, in rank order, none twice.
    assert [line["result"]["slice"] for line in lines] == [[2 * rank, 2 * rank + 1] for rank in range(ranks)]
    for line in lines:
        result = line["result"]
        assert result["vector"] == [(ranks - 1) / 2, 1.0, float(ranks)]
        assert result["matrix"] == [[3 * (ranks - 1) / 2] * 2] * 2
        assert result["gathered"] == [f"rank {rank}" for rank in range(ranks)]


def test_a_batch_that_does_not_split_evenly_is_a_bug() -> None:
    ctx = RankContext(None, 1, 3, 1, 3, "here")  # no communicator needed: slicing is local
    assert ctx.own_slice("abcdef") == "cd"
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        ctx.own_slice([1, 2, 3, 4])


CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "launch",
    [
        [],  # OpenMPI's default: each of 2 ranks bound to a core, 3 or more to a socket
        ["--bind-to", "none"],  # every rank sees every CPU
        ["--cpu-set", str(CPUS[0]), "--bind-to", "core"],  # every rank bound to the same core
    ],
    ids=["default-binding", "unbound", "one-core-for-all"],
)
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_every_cpu_is_used_once_whatever_mpirun_bound(
    ranks_run: Callable[..., list[dict]], ranks: int, launch: list[str]
) -> None:
    lines = ranks_run("cpus", ranks, *launch)
    shares = [line["result"]["share"] for line in lines]
    for line in lines:
        assert line["result"]["runs_on"] == line["result"]["share"]
        assert line["result"]["threads"] == len(line["result"]["share"])
    if ranks <= len(CPUS):  # disjoint, covering every CPU, as even as can be
        assert sorted(cpu for share in shares for cpu in share) == CPUS
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:  # a CPU each, in turn
        assert [share for share in shares] == [[CPUS[rank % len(CPUS)]] for rank in range(ranks)]


@pytest.mark.skipif(len(CPUS) < 2 or not shutil.which("taskset"), reason="needs two CPUs and taskset")
def test_ranks_stay_inside_the_cpus_the_launcher_was_given(ranks_run: Callable[..., list[dict]]) -> None:
    # The job was given one CPU (as a Slurm cgroup or taskset would): both ranks share it.
    lines = ranks_run("cpus", 2, "taskset", "-c", str(CPUS[-1]), "mpirun", "--bind-to", "none")
    assert [line["result"]["runs_on"] for line in lines] == [[CPUS[-1]], [CPUS[-1]]]
