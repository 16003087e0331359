#!/usr/bin/env bash
# Lint and type-check, then the whole test suite: unit tests, the real program in-process, multi-rank runs
# under Debian's OpenMPI, and sbatch jobs on a real single-node Slurm the tests start.
# Run scripts/setup.sh --test first. Extra arguments go to pytest.
# A missing service (Slurm, shellcheck) fails the run; MPISTYLE_REQUIRE_SERVICES=0 skips instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "test: run scripts/setup.sh first" >&2; exit 1; }
export MPISTYLE_REQUIRE_SERVICES=${MPISTYLE_REQUIRE_SERVICES:-1}
.venv/bin/ruff check src tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
