"""The benchmark suite still runs: every bench/ case once, with minimal rounds, on this
machine (CUDA-only comparisons skip here). Its stubs and helpers reach into fastlayers'
internals (bench_host_time replaces use_triton), so a change there can break the suite the
GPU check runs; this catches it on CPU. Timings are not looked at."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_benchmark_runs_once(tmp_path):
    env = {**os.environ, "BENCH_ROUNDS": "1"}
    env.pop("TRITON_INTERPRET", None)  # host-time cases stub the GPU path, uninterpreted
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
         "--benchmark-only", "--benchmark-min-rounds=1", "--benchmark-max-time=0.001",
         "--benchmark-warmup=off", "--benchmark-json", str(tmp_path / "bench.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
    assert (tmp_path / "bench.json").stat().st_size > 0
