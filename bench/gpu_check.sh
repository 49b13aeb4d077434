#!/usr/bin/env bash
# The project's GPU check: CUDA tests, then the benchmark suite, then a compact table.
# Run from the repository root on a machine with a CUDA GPU (torch + triton installed):
#     bash bench/gpu_check.sh            # full JSON, logs and plot under $OUT (default /tmp/fastlayers-gpu)
# Budget: about 6 minutes on an H200; each phase is capped (GPU_CHECK_CUDA_TEST_S=60,
# GPU_CHECK_TEST_S=180, GPU_CHECK_BENCH_S=270), so even a slow run reports in under 9.
# GPU_CHECK_DRY_RUN=1 lets it run without a GPU (to try the script itself on a CPU).
# Narrow it with GPU_CHECK_TESTS="tests/test_gemm.py ..." and GPU_CHECK_BENCH="bench/bench_x.py";
# GPU_CHECK_BENCH=none skips the benchmarks; GPU_CHECK_SWEEP=1 adds a GEMM launch-config sweep (python -m bench.sweep_gemm).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fastlayers-gpu}
SITE=${SITE:-/tmp/fastlayers-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "install fastlayers into $SITE (no deps, no network)"
rm -rf "$SITE"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "$REPO" \
    >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 2; }
# Run from outside the checkout so `import fastlayers` is the installed package (with kernels).
cd /tmp
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$OUT/env.txt"
import json, torch, fastlayers
info = fastlayers.backend_info()
print(json.dumps(info, indent=1))
import os
if os.environ.get("GPU_CHECK_DRY_RUN") != "1":
    assert info["devices"]["cuda"]["path"] == "triton", "CUDA tensors would not run the Triton kernels"
PY
[ $? -eq 0 ] || exit 3

XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-8}"
TIMEOUT=""  # a hung kernel fails its test instead of eating the whole phase
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout=${GPU_CHECK_CASE_S:-120}"
# Each phase runs under `timeout -s INT`: on time-out pytest stops as after Ctrl-C and still
# writes its summary, junit XML and benchmark JSON for what finished (-k: then kill).
phase() {  # phase NAME SECONDS LOG CMD...: run, show the tail, note failure or time-out
    local name=$1 secs=$2 log=$3; shift 3
    timeout -s INT -k 30 "$secs" "$@" >"$log" 2>&1
    local rc=$?
    [ $rc -eq 5 ] && rc=0  # pytest: nothing selected (a narrowed GPU_CHECK_TESTS)
    tail -n "${TAIL:-25}" "$log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=1; stamp "$name TIMED OUT after ${secs}s (partial results kept)"
    elif [ $rc -ne 0 ]; then
        status=1; stamp "$name FAILED (rc=$rc)"
    fi
}
TESTS=${GPU_CHECK_TESTS:-tests}
TEST_PATHS=$(for t in $TESTS; do echo "$REPO/$t"; done)
# The CUDA-only tests first (64-bit offsets, sync-freedom, GPU sizes), so they always report.
stamp "CUDA-only tests (-m cuda)"
phase "CUDA-ONLY TESTS" "${GPU_CHECK_CUDA_TEST_S:-60}" "$OUT/tests_cuda.log" \
    python3 -m pytest $TEST_PATHS -m cuda -q -p no:cacheprovider $TIMEOUT -o addopts="" -rfEs \
    --junitxml="$OUT/tests_cuda.xml"
stamp "all other tests (kernels on the GPU)"
phase "TESTS" "${GPU_CHECK_TEST_S:-180}" "$OUT/tests.log" \
    python3 -m pytest $TEST_PATHS -m "not cuda" -q -p no:cacheprovider $XDIST $TIMEOUT \
    -o addopts="" -rfEs --junitxml="$OUT/tests.xml"

# LinearReLU first: if the phase runs out of time, the most-asked-for figures are in.
BENCH=${GPU_CHECK_BENCH:-bench/bench_linear_relu.py bench/bench_fixed_hidden_mlp.py bench/bench_centered.py}
if [ "$BENCH" != none ]; then
    stamp "benchmarks"
    TAIL=5 phase "BENCHMARKS" "${GPU_CHECK_BENCH_S:-270}" "$OUT/bench.log" \
        python3 -m pytest $(for t in $BENCH; do echo "$REPO/$t"; done) -q -p no:cacheprovider \
        --benchmark-only --benchmark-json="$OUT/bench.json" $TIMEOUT ${GPU_CHECK_BENCH_ARGS:-}
    grep -E "^(E |FAILED)" "$OUT/bench.log" | head -n 20
fi

if [ "${GPU_CHECK_SWEEP:-0}" != 0 ]; then
    stamp "GEMM config sweep"
    timeout 150 python3 -m bench.sweep_gemm | tee "$OUT/sweep.txt"
fi

stamp "fp32 accuracy (relative error vs float64)"
python3 -m bench.accuracy | tee "$OUT/accuracy.txt"

if [ -s "$OUT/bench.json" ]; then
    stamp "report"
    python3 -m bench.report "$OUT/bench.json" --png "$OUT/bench.png" --markdown "$OUT/report.md" --png-link bench/results/h200.png --title "H200" | tee "$OUT/report.txt"
fi
stamp "done (status $status)"
exit $status
