#!/usr/bin/env bash
# The project's GPU check: CUDA tests, the benchmark suite, the kernel tests, a table last.
# Run from the repository root on a machine with a CUDA GPU (torch + triton installed):
#     bash bench/gpu_check.sh     # results under $OUT (default /tmp/fastlayers-gpu)
# One deadline for the whole run (GPU_CHECK_DEADLINE_S, default 450 s: it fits a 600 s
# command with room for the install and the report); each phase gets what is left, the
# benchmarks right after the CUDA-only tests (the figures the README waits for).
# What comes back: $OUT holds at most 8 files (the device tool's limit): results.tar.gz
# (every log, XML and JSON, rebuilt after each phase, so a kill still leaves the latest),
# summary.txt (phases, exit codes, time-outs), env.txt, bench.json, report.md, bench.png,
# accuracy.txt. GPU_CHECK_DRY_RUN=1 runs it without a GPU (to try the script on a CPU).
# Narrow it with GPU_CHECK_TESTS="tests/test_gemm.py ..." and GPU_CHECK_BENCH="bench/bench_x.py";
# GPU_CHECK_BENCH=none skips the benchmarks; GPU_CHECK_SWEEP=1 adds a GEMM launch-config sweep.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fastlayers-gpu}
WORK=${GPU_CHECK_WORK:-/tmp/fastlayers-gpu-work}
SITE=${SITE:-/tmp/fastlayers-site}
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$WORK/summary.txt"; }
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
pack() {  # every work file into one archive under $OUT (atomically), summary beside it
    tar -czf "$OUT/.results.tar.gz" -C "$WORK" . 2>/dev/null && \
        mv -f "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
    cp -f "$WORK/summary.txt" "$OUT/summary.txt"
}

stamp "install fastlayers into $SITE (no deps, no network)"
rm -rf "$SITE"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "$REPO" \
    >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; stamp "INSTALL FAILED"; pack; exit 2; }
# Run from outside the checkout so `import fastlayers` is the installed package (with kernels);
# the benchmarks' pytest uses --import-mode=append for the same reason (bench/ is a package:
# prepend mode would put the checkout, which has no fastlayers.kernels, first on sys.path).
cd /tmp
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' 2>&1 | tee "$WORK/env.txt"
import json, os, torch, fastlayers
info = fastlayers.backend_info()
print(json.dumps(info, indent=1))
if os.environ.get("GPU_CHECK_DRY_RUN") != "1":
    assert info["devices"]["cuda"]["path"] == "triton", "CUDA tensors would not run the Triton kernels"
PY
[ $? -eq 0 ] || { stamp "ENVIRONMENT CHECK FAILED"; cp -f "$WORK/env.txt" "$OUT/"; pack; exit 3; }
cp -f "$WORK/env.txt" "$OUT/"

XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-8}"
CASE_TIMEOUT=""  # a hung kernel fails its test (thread method: a CUDA wait ignores signals)
python3 -c "import pytest_timeout" 2>/dev/null && \
    CASE_TIMEOUT="--timeout=${GPU_CHECK_CASE_S:-40} --timeout-method=thread"
# Each phase runs under `timeout -s INT` with what is left of the deadline (at most its own
# cap): on time-out pytest stops as after Ctrl-C and still writes its summary, junit XML and
# benchmark JSON for what finished (-k 15: then kill).
phase() {  # phase NAME CAP LOG CMD...: run, show the tail, note failure or time-out, pack
    local name=$1 cap=$2 log=$3; shift 3
    local secs; secs=$(left); [ "$secs" -gt "$cap" ] && secs=$cap
    if [ "$secs" -lt 10 ]; then
        status=1; stamp "$name SKIPPED: the deadline is reached"; return
    fi
    stamp "$name (up to ${secs}s)"
    timeout -s INT -k 15 "$secs" "$@" >"$log" 2>&1
    local rc=$?
    [ $rc -eq 5 ] && rc=0  # pytest: nothing selected (a narrowed GPU_CHECK_TESTS)
    tail -n "${TAIL:-25}" "$log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=1; stamp "$name TIMED OUT after ${secs}s (partial results kept)"
    elif [ $rc -ne 0 ]; then
        status=1; stamp "$name FAILED (rc=$rc)"
    else
        stamp "$name passed"
    fi
    pack
}
# The kernel tests by default (the CPU-only concerns, io, ONNX, the tour and the sm_90
# compile gate run in CI); GPU_CHECK_TESTS=tests runs everything.
KERNEL_TESTS="tests/test_far_offsets.py tests/test_rounding.py tests/test_linear_relu.py
tests/test_gemm.py tests/test_centered.py tests/test_fixed_hidden.py tests/test_blocks.py
tests/test_fixed_hidden_mlp_kernel.py tests/test_halve_until.py tests/test_halve_numerics.py
tests/test_halve_subnormal.py tests/test_parity_ops.py tests/test_parity_modules.py
tests/test_parity_autograd.py tests/test_special_values.py tests/test_edge_cases.py
tests/test_compile_dynamic.py tests/test_device.py"
TESTS=${GPU_CHECK_TESTS:-$KERNEL_TESTS}
TEST_PATHS=$(for t in $TESTS; do echo "$REPO/$t"; done)
PYTEST="python3 -m pytest -p no:cacheprovider -o addopts= -rfEs"

# The CUDA-only tests first (64-bit offsets, sync-freedom, GPU sizes), verbose so a hang
# names its test.
phase "CUDA-ONLY TESTS" "${GPU_CHECK_CUDA_TEST_S:-90}" "$WORK/tests_cuda.log" \
    $PYTEST $TEST_PATHS -m cuda -v $CASE_TIMEOUT --junitxml="$WORK/tests_cuda.xml"

# LinearReLU first: if the phase runs out of time, the most-asked-for figures are in.
BENCH=${GPU_CHECK_BENCH:-bench/bench_linear_relu.py bench/bench_fixed_hidden_mlp.py bench/bench_centered.py}
if [ "$BENCH" != none ]; then
    TAIL=5 phase "BENCHMARKS" "${GPU_CHECK_BENCH_S:-240}" "$WORK/bench.log" \
        $PYTEST --import-mode=append $(for t in $BENCH; do echo "$REPO/$t"; done) -q \
        --benchmark-only --benchmark-json="$WORK/bench.json" $CASE_TIMEOUT ${GPU_CHECK_BENCH_ARGS:-}
    grep -E "^(E |FAILED)" "$WORK/bench.log" | head -n 20
    [ -s "$WORK/bench.json" ] && cp -f "$WORK/bench.json" "$OUT/"
fi

if [ -s "$WORK/bench.json" ]; then
    stamp "report"
    timeout 60 python3 -m bench.report "$WORK/bench.json" --png "$WORK/bench.png" \
        --markdown "$WORK/report.md" --png-link bench/results/h200.png --title "H200" \
        2>&1 | tee "$WORK/report.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; stamp "REPORT FAILED"; }
    cp -f "$WORK/report.md" "$WORK/bench.png" "$OUT/" 2>/dev/null
    pack
fi

phase "TESTS" "${GPU_CHECK_TEST_S:-150}" "$WORK/tests.log" \
    $PYTEST $TEST_PATHS -m "not cuda and not slow" -q $XDIST $CASE_TIMEOUT \
    --junitxml="$WORK/tests.xml"

if [ "${GPU_CHECK_SWEEP:-0}" != 0 ]; then
    phase "GEMM CONFIG SWEEP" 150 "$WORK/sweep.txt" python3 -m bench.sweep_gemm
fi

phase "FP32 ACCURACY" 60 "$WORK/accuracy.txt" python3 -m bench.accuracy
cp -f "$WORK/accuracy.txt" "$OUT/" 2>/dev/null
stamp "done (status $status)"
pack
exit $status
