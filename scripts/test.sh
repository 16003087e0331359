#!/usr/bin/env bash
# Lint, then the whole test suite: unit tests, the real program in-process, and multi-rank runs
# under Debian's OpenMPI. Run scripts/setup.sh first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "test: run scripts/setup.sh first" >&2; exit 1; }
.venv/bin/ruff check src tests
.venv/bin/python -m pytest "$@"
