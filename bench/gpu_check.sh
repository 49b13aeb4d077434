#!/usr/bin/env bash
# The project's GPU check: CUDA tests, then the benchmark suite, then a compact table.
# Run from the repository root on a machine with a CUDA GPU (torch + triton installed):
#     bash bench/gpu_check.sh            # full JSON, logs and plot under $OUT (default /tmp/fastlayers-gpu)
# Budget: about 6 minutes on an H200 (GPU_CHECK_TEST_S / GPU_CHECK_BENCH_S cap each phase).
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
assert info["devices"]["cuda"]["path"] == "triton", "CUDA tensors would not run the Triton kernels"
PY
[ $? -eq 0 ] || exit 3

stamp "tests (all of tests/, kernels on the GPU)"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-8}"
TIMEOUT=""  # a hung kernel fails its test instead of eating the whole phase
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout=${GPU_CHECK_CASE_S:-120}"
TESTS=${GPU_CHECK_TESTS:-tests}
timeout "${GPU_CHECK_TEST_S:-200}" python3 -m pytest $(for t in $TESTS; do echo "$REPO/$t"; done) -q -p no:cacheprovider $XDIST $TIMEOUT \
    -o addopts="" -rfEs --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
rc=$?
tail -n 25 "$OUT/tests.log"
[ $rc -eq 0 ] || { status=1; stamp "TESTS FAILED (rc=$rc)"; }

BENCH=${GPU_CHECK_BENCH:-bench}
if [ "$BENCH" != none ]; then
    stamp "benchmarks"
    timeout "${GPU_CHECK_BENCH_S:-300}" python3 -m pytest $(for t in $BENCH; do echo "$REPO/$t"; done) -q -p no:cacheprovider \
        --benchmark-only --benchmark-json="$OUT/bench.json" $TIMEOUT ${GPU_CHECK_BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1
    rc=$?
    grep -E "passed|failed|error" "$OUT/bench.log" | tail -n 5
    [ $rc -eq 0 ] || { status=1; stamp "BENCHMARKS FAILED (rc=$rc)"; grep -E "^(E |FAILED)" "$OUT/bench.log" | head -n 20; }
fi

if [ "${GPU_CHECK_SWEEP:-0}" != 0 ]; then
    stamp "GEMM config sweep"
    timeout 150 python3 -m bench.sweep_gemm | tee "$OUT/sweep.txt"
fi

stamp "fp32 accuracy (relative error vs float64)"
python3 -m bench.accuracy | tee "$OUT/accuracy.txt"

if [ -s "$OUT/bench.json" ]; then
    stamp "report"
    python3 -m bench.report "$OUT/bench.json" --png "$OUT/bench.png" | tee "$OUT/report.txt"
fi
stamp "done (status $status)"
exit $status
