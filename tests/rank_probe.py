"""Run under mpirun by tests/test_parallel.py: exercises RankContext with real MPI."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mpistyle.devices import set_threads
from mpistyle.errors import ModelError
from mpistyle.parallel import RankContext, Shift, attempt


def main(case: str, out_dir: Path) -> None:
    ctx = RankContext.world()
    result: object
    if case == "large-from-root":
        # Far past the 32 KiB a buffer-less irecv would get.
        value = ctx.from_root(lambda: list(range(300_000)))
        result = [len(value), value[-1]]
    elif case == "from-root-error":
        outcome = attempt(lambda: ctx.from_root(_fail))
        result = [outcome[0], type(outcome[1]).__name__, str(outcome[1])]
    elif case == "check-all":
        outcome = attempt(lambda: ctx.check_all(lambda: _fail() if ctx.rank == ctx.size - 1 else ctx.rank))
        result = [outcome[0], str(outcome[1])]
    elif case == "progress":
        seen: list[int] = []
        summaries = ctx.run_everywhere(lambda shift: {"ticks": [shift.tick(ctx.rank + 1) for _ in range(3)]}, seen.append)
        result = {"summaries": summaries, "frames": sum(seen)}
    elif case == "handout":
        slow = ctx.size > 1 and ctx.rank == ctx.size - 1  # four times slower than the others
        taken = ctx.run_everywhere(lambda shift: _take_all(shift, 0.04 if slow else 0.01), lambda n: None, iter(range(40)))
        result = {"taken": taken}
    elif case == "notes":
        # Each rank notes every item it takes: the root hears them all, each from its taker.
        noted: list[list[int]] = []
        taken = ctx.run_everywhere(lambda shift: _take_all(shift, 0.0), lambda n: None, iter(range(30)),
                                   lambda rank, item: noted.append([rank, item]))
        result = {"noted": noted, "taken": taken}
    elif case == "cpus":
        bound = sorted(os.sched_getaffinity(0))
        threads = set_threads(None, ctx.cpus)
        result = {"bound": bound, "share": sorted(ctx.cpus), "threads": threads, "runs_on": sorted(os.sched_getaffinity(0))}
    elif case == "training":
        result = _training_collectives(ctx)
    else:
        raise SystemExit(f"unknown case {case}")
    # One file per rank: lines printed by several ranks at once can interleave.
    line = {"rank": ctx.rank, "local_rank": ctx.local_rank, "size": ctx.size, "result": result}
    (out_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(line))


def _training_collectives(ctx: RankContext) -> dict[str, object]:
    """What data-parallel training asks of the ranks: a slice of the batch, a mean, a gather."""
    import torch

    # Shapes and values differ per tensor, and per rank: the mean must put each back in place.
    vector = torch.tensor([ctx.rank, 1.0, 2.0 * ctx.rank + 1])
    matrix = torch.full((2, 2), 3.0 * ctx.rank)
    ctx.mean_in_place([vector, matrix])
    return {
        "slice": list(ctx.own_slice(list(range(2 * ctx.size)))),
        "vector": vector.tolist(),
        "matrix": matrix.tolist(),
        "gathered": ctx.gather_all(f"rank {ctx.rank}"),
    }


def _take_all(shift: Shift, seconds_per_item: float) -> list[int]:
    """Take items until none are left, each taking ``seconds_per_item``, and note each to the root."""
    taken = []
    while (item := shift.take()) is not None:
        taken.append(item)
        shift.note(item)
        time.sleep(seconds_per_item)
        shift.tick(1)
    return taken


def _fail() -> int:
    raise ModelError("checkpoint does not fit")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
