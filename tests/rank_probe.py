"""Run under mpirun by tests/test_parallel.py: exercises RankContext with real MPI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mpistyle.errors import ModelError
from mpistyle.parallel import RankContext, attempt


def main(case: str, out_dir: Path) -> None:
    ctx = RankContext.world()
    result: object
    if case == "large-share":
        # Far past the 32 KiB a buffer-less irecv would get.
        value = ctx.share(lambda: list(range(300_000)))
        result = [len(value), value[-1]]
    elif case == "share-error":
        outcome = attempt(lambda: ctx.share(_fail))
        result = [outcome[0], type(outcome[1]).__name__, str(outcome[1])]
    elif case == "check-all":
        outcome = attempt(lambda: ctx.check_all(lambda: _fail() if ctx.rank == ctx.size - 1 else ctx.rank))
        result = [outcome[0], str(outcome[1])]
    elif case == "progress":
        seen: list[int] = []
        summaries = ctx.run_everywhere(lambda tick: {"ticks": [tick(ctx.rank + 1) for _ in range(3)]}, seen.append)
        result = {"summaries": summaries, "frames": sum(seen)}
    else:
        raise SystemExit(f"unknown case {case}")
    # One file per rank: lines printed by several ranks at once can interleave.
    line = {"rank": ctx.rank, "local_rank": ctx.local_rank, "size": ctx.size, "result": result}
    (out_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(line))


def _fail() -> int:
    raise ModelError("checkpoint does not fit")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
