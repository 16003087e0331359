#!/bin/bash
# mpistyle cluster-init, execute nodes: log the GPUs this node has, wait for the shared virtual
# environment the scheduler builds, and check that it runs here. A node that cannot run mpistyle
# fails its start (CycleCloud shows why; slurmd is never started, so Slurm never gets the node):
#   - mpistyle.expect_gpu is true (the gpu nodearray) and nvidia-smi finds no GPU: the image
#     has no NVIDIA driver;
#   - the scheduler recorded a failed build (<root>/.install-failed), or the environment is not
#     ready within mpistyle.venv_wait_minutes (default 15);
#   - its Python does not run here (nodes on different images), or its torch sees no GPU on a
#     GPU node (a CPU-only torch build).
# Slurm itself gives up on a node that has not registered ResumeTimeout (1800 s) after it asked
# for it, and shuts it down: the wait stays well inside that, so the node fails with its own reason.
set -euo pipefail
PATH=$PATH:/opt/cycle/jetpack/bin  # jetpack, also when run again by hand under sudo

say() { echo "mpistyle (execute): $*"; }
fail() { echo "mpistyle (execute): error: $*" >&2; exit 1; }

root=$(jetpack config mpistyle.root /shared/mpistyle)
expect_gpu=$(jetpack config mpistyle.expect_gpu false)
expect_gpu=${expect_gpu,,}  # jetpack may print booleans as True/False
wait_minutes=$(jetpack config mpistyle.venv_wait_minutes 15)
venv=$root/venv

gpus=""
if command -v nvidia-smi >/dev/null 2>&1 \
  && gpus=$(nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1); then
  say "nvidia-smi sees $(printf '%s\n' "$gpus" | wc -l) GPU(s):"
  printf '%s\n' "$gpus" | sed 's/^/mpistyle (execute):   /'
elif [ "$expect_gpu" = true ]; then
  fail "no working nvidia-smi on this GPU node (${gpus:-not installed}): use an image with the NVIDIA driver, such as the Azure HPC Ubuntu image"
else
  say "no GPU here (nvidia-smi absent or failing): a CPU node"
fi

deadline=$((SECONDS + wait_minutes * 60))
until [ -f "$venv/.mpistyle-install" ]; do
  if [ -f "$root/.install-failed" ]; then
    fail "the scheduler could not build $venv: $(cat "$root/.install-failed") (see cyclecloud/README.md)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "$venv is not ready after $wait_minutes minute(s): the scheduler builds it (see its cluster-init log, and cyclecloud/README.md)"
  fi
  say "waiting for the scheduler to build $venv"
  sleep 30
done

"$venv/bin/python" -c '' 2>/dev/null \
  || fail "$venv/bin/python does not run on this node: every node must use the same image (ImageName)"
"$venv/bin/python" - "$expect_gpu" <<'PY'
import sys

import mpi4py

mpi4py.rc.initialize = False  # only report the MPI library: no launcher here
from mpi4py import MPI

import mpistyle
import torch

gpus = torch.cuda.device_count()
mpi = MPI.Get_library_version().splitlines()[0].strip()
print(f"mpistyle (execute): mpistyle {mpistyle.__version__}, torch {torch.__version__}, {gpus} CUDA device(s), {mpi}")
if sys.argv[1] == "true" and gpus == 0:
    sys.exit("mpistyle (execute): error: torch sees no GPU on this GPU node: set mpistyle.torch to a CUDA build"
             " and rebuild on the scheduler with MPISTYLE_REINSTALL=1")
PY
