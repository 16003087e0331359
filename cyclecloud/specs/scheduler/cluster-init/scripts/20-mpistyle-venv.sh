#!/bin/bash
# mpistyle cluster-init, scheduler: the one virtual environment every node runs mpistyle from,
# <root>/venv on the shared filesystem, and the shared staging and run directories.
# Runs at every start of the scheduler; run it again by hand after putting the source in place:
#   sudo bash /mnt/cluster-init/mpistyle/scheduler/scripts/20-mpistyle-venv.sh
# A marker in the environment records what was installed (source, torch, interpreter): when it
# matches, nothing is rebuilt. MPISTYLE_REINSTALL=1 rebuilds anyway (new code at the same path);
# do that with no jobs running. A lock keeps two runs from building at once.
# At boot a failure here must not fail the node: cyclecloud/slurm starts slurmctld only after every
# cluster-init script has succeeded (its delayed_services recipe runs last), so a failed build would
# leave the cluster without a scheduler. Under cluster-init (CycleCloud sets CYCLECLOUD_SPEC_PATH)
# the script reports the failure, records it in <root>/.install-failed, where the execute nodes
# look, and exits 0; run by hand it exits 1.
# Configuration (jetpack config):
#   mpistyle.root    default /shared/mpistyle
#   mpistyle.source  what pip installs as mpistyle (default <root>/src, a copy of the repository)
#   mpistyle.torch   pip arguments for torch (default torch==2.13.0); MPISTYLE_TORCH overrides it
#   mpistyle.python  the interpreter (default /usr/bin/python3 where it is >= 3.11, else python3.11)
set -euo pipefail
PATH=$PATH:/opt/cycle/jetpack/bin  # jetpack, also when run again by hand under sudo

say() { echo "mpistyle (scheduler): $*"; }
reason=""
fail() { reason=$*; echo "mpistyle (scheduler): error: $*" >&2; exit 1; }

record=""  # <root>/.install-failed, once the root is known
finish() {
  local status=$?
  if [ "$status" -eq 0 ]; then
    [ -z "$record" ] || rm -f "$record"
    return
  fi
  if [ -n "$record" ] && [ -d "$(dirname "$record")" ]; then
    printf '%s\n' "${reason:-a step exited with status $status}; see the scheduler's cluster-init log" >"$record" || true
  fi
  if [ -n "${CYCLECLOUD_SPEC_PATH:-}" ]; then
    echo "mpistyle (scheduler): error: ${venv:-the environment} was not built; slurmctld starts anyway." \
      "Fix the cause, then run: sudo bash $0" >&2
    exit 0
  fi
}
trap finish EXIT

root=$(jetpack config mpistyle.root /shared/mpistyle)
src=$(jetpack config mpistyle.source "$root/src")
torch=${MPISTYLE_TORCH:-$(jetpack config mpistyle.torch torch==2.13.0)}
python=$(jetpack config mpistyle.python "")
if [ -z "$python" ]; then
  # The same choice as the every-node spec, which installed this interpreter on every node.
  python=/usr/bin/python3.11
  /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && python=/usr/bin/python3
fi
venv=$root/venv
marker=$venv/.mpistyle-install

[ -d "$(dirname "$root")" ] || fail "$(dirname "$root") does not exist: is the shared filesystem mounted?"
# Every user's jobs make their own directories in these: world-writable and sticky, like /tmp.
for dir in "$root" "$root/staging" "$root/runs"; do
  mkdir -p "$dir"
done
record=$root/.install-failed
chmod 1777 "$root/staging" "$root/runs"

if [[ "$src" == /* && ! -e "$src" ]]; then
  say "nothing to install yet: $src does not exist. Put a copy of the mpistyle repository there" \
    "(git clone, or rsync from your machine) or set mpistyle.source to a wheel, a git+https URL or" \
    "a requirement, then run: sudo bash $0"
  exit 0
fi

exec 9>"$root/.install.lock"
flock -w 3600 9 || fail "another install has held $root/.install.lock for an hour"
wanted=$(printf 'source=%s\ntorch=%s\npython=%s' "$src" "$torch" "$python")
if [ "${MPISTYLE_REINSTALL:-0}" != 1 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$wanted" ]; then
  say "$venv is up to date (source $src, $torch): nothing to do"
  exit 0
fi

[ -x "$python" ] || fail "$python not found: the every-node spec installs it; or set mpistyle.python"
rm -f "$record"  # a new attempt: execute nodes wait for it rather than give up on an old failure
say "building $venv with $("$python" --version) from $src and $torch"
reason="building $venv from $src with $torch failed"
rm -rf "$venv"  # a half-built environment (no marker) or a different one: start clean
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir)
"${pip[@]}" --upgrade pip
read -r -a torch_args <<<"$torch"
"${pip[@]}" "${torch_args[@]}"
# mpi4py from source against Ubuntu's OpenMPI, which every node has: not a binary wheel's MPI,
# and not the HPC image's HPC-X, which is not on every node's default paths.
MPICC=/usr/bin/mpicc "${pip[@]}" --no-binary mpi4py "$src"

"$venv/bin/python" - <<'PY'
import mpi4py

mpi4py.rc.initialize = False  # only report the MPI library: no launcher here
from mpi4py import MPI

import mpistyle
import torch

mpi = MPI.Get_library_version().splitlines()[0].strip()
print(f"mpistyle (scheduler): mpistyle {mpistyle.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), {mpi}")
PY
printf '%s\n' "$wanted" >"$marker.tmp"
mv "$marker.tmp" "$marker"
say "ready: $venv"
