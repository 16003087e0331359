#!/usr/bin/env bash
# The demo: make a 5-second 640x360 sample clip with sound, restyle it with the default model on
# 2 MPI ranks, and say where the output, preview and report are. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mpistyle ] || { echo "demo: run scripts/setup.sh first" >&2; exit 1; }
# OpenMPI refuses to start as root unless told it is fine (containers, CI machines).
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

mkdir -p demo
.venv/bin/mpistyle-sample demo/sample.mp4 --seconds 5 --size 640x360
# --oversubscribe: two ranks even on a one-core machine.
MPISTYLE_RUNS_DIR=demo/runs mpirun -n 2 --oversubscribe \
  .venv/bin/mpistyle input=demo/sample.mp4 output=demo/sample-styled.mp4 "$@"
echo
echo "demo: styled video  $(pwd)/demo/sample-styled.mp4"
echo "demo: preview       $(pwd)/demo/sample-styled.mp4.preview.png"
echo "demo: job report    $(pwd)/demo/sample-styled.mp4.report.json"
