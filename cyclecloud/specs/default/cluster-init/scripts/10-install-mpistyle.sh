#!/bin/bash
# mpistyle cluster-init, every node: what the shared virtual environment needs from the system,
# and the environment slurm/style.sbatch reads.
#   - OpenMPI (openmpi-bin, libopenmpi-dev): mpi4py is built against it on the scheduler and
#     loads it at run time on every node; gcc; a Python >= 3.11 with venv and headers (Ubuntu
#     22.04's python3 is 3.10, so python3.11 from its universe repository there).
#   - /etc/profile.d/mpistyle.sh (from files/mpistyle-profile.sh): MPISTYLE_PYTHON,
#     MPISTYLE_STAGING, MPISTYLE_RUNS_DIR, and the environment's bin/ on PATH.
# The environment itself is built once, by the scheduler spec. Safe to run again.
# Configuration (jetpack config): mpistyle.root, default /shared/mpistyle.
set -euo pipefail
PATH=$PATH:/opt/cycle/jetpack/bin  # jetpack, also when run again by hand under sudo

say() { echo "mpistyle (every node): $*"; }
fail() { echo "mpistyle (every node): error: $*" >&2; exit 1; }

root=$(jetpack config mpistyle.root /shared/mpistyle)
spec=${CYCLECLOUD_SPEC_PATH:-$(cd "$(dirname "$0")/.." && pwd)}

command -v apt-get >/dev/null 2>&1 \
  || fail "not a Debian or Ubuntu node: install OpenMPI with mpicc, gcc, and Python >= 3.11 with venv and headers yourself, or use the Ubuntu HPC image"

packages=(openmpi-bin libopenmpi-dev gcc)
if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  packages+=(python3-venv python3-dev)
else
  packages+=(python3.11 python3.11-venv python3.11-dev)
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # At boot other apt runs (unattended-upgrades, the image's agents) may hold the dpkg lock: wait.
  apt=(apt-get -q -o DPkg::Lock::Timeout=600)
  "${apt[@]}" update
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
else
  say "system packages present: ${packages[*]}"
fi
say "OpenMPI $(dpkg-query -W -f='${Version}' openmpi-bin)"

profile=/etc/profile.d/mpistyle.sh
sed "s|@MPISTYLE_ROOT@|$root|g" "$spec/files/mpistyle-profile.sh" >"$profile.tmp"
chmod 644 "$profile.tmp"
mv "$profile.tmp" "$profile"
say "wrote $profile: MPISTYLE_PYTHON=$root/venv/bin/python MPISTYLE_STAGING=$root/staging MPISTYLE_RUNS_DIR=$root/runs"
