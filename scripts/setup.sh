#!/usr/bin/env bash
# Set up mpistyle on a fresh Debian machine: OpenMPI from Debian's packages, then a virtual
# environment (.venv) holding the package with its test tools. Safe to run again.
#   --test          also install what the tests start for real: Slurm (slurm-wlm, munge),
#                   Azurite (the Azure Storage emulator, from npm, into .cache/azurite), the
#                   shell linter the tests run, and checkov (the ARM template linter for
#                   deploy/azure/, from PyPI, into a venv of its own: .cache/checkov)
#   MPISTYLE_TORCH  which torch to install (default torch==2.13.0: the CPU build where one lies
#                   on local disk, as on our dev/CI machines; a CUDA build from PyPI elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    *) echo "setup: unknown option '$arg' (only --test)" >&2; exit 2 ;;
  esac
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
for pkg in openmpi-bin libopenmpi-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# mpi4py compiles against the system MPI: it needs a C compiler and Python's headers.
command -v gcc >/dev/null || need+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "$with_tests" = 1 ]; then
  # iproute2 and util-linux (ip, nsenter, unshare): the multi-node tests' network namespaces.
  for pkg in slurm-wlm munge shellcheck iproute2 util-linux; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  command -v npm >/dev/null || need+=(nodejs npm)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: mpistyle needs Python 3.11 or newer, python3 is {sys.version.split()[0]}")
PY
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "${MPISTYLE_TORCH:-torch==2.13.0}"
"${pip[@]}" -e ".[test]"
if [ "$with_tests" = 1 ] && [ ! -x .cache/azurite/node_modules/.bin/azurite-blob ]; then
  echo "setup: installing Azurite from npm into .cache/azurite"
  npm install --prefix .cache/azurite --no-audit --no-fund --loglevel=error azurite@3.37.0 >/dev/null
fi
if [ "$with_tests" = 1 ] && [ ! -x .cache/checkov/bin/checkov ]; then
  echo "setup: installing checkov from PyPI into .cache/checkov"
  # A venv of its own: checkov pins many packages that would clash with mpistyle's.
  python3 -m venv .cache/checkov
  .cache/checkov/bin/python -m pip install -q --disable-pip-version-check checkov==3.3.30
fi
.venv/bin/python -c 'import mpi4py.MPI, torch, av, h5py, hydra; print("setup: ready,", "torch", torch.__version__, "| PyAV", av.__version__, "|", mpi4py.MPI.Get_library_version().splitlines()[0][:40])'
