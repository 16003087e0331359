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
def ranks_run(tmp_path: Path) -> Callable[[str, int], list[dict]]:
    def run(case: str, ranks: int) -> list[dict]:
        mpirun = shutil.which("mpirun")
        assert mpirun, "mpirun not found: install Debian's openmpi-bin (scripts/setup.sh does)"
        out = tmp_path / f"{case}-{ranks}"
        out.mkdir()
        done = subprocess.run(
            [mpirun, "-n", str(ranks), sys.executable, str(TESTS / "rank_probe.py"), case, str(out)],
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
