"""pytest fixtures of the benchmark suite: ``ceilings`` (measured once per run, again at the
end) and ``record`` (times one case and stores everything the report needs in extra_info).
The JSON hook at the end adds the run's environment (date, CPU/GPU, versions, command) and
every fastlayers result's speedups over the baselines of its case."""
import datetime
import functools
import itertools
import os
import platform
import shlex

import pytest
import torch

import fastlayers
from bench.harness import (ON_GPU, ROUND_S, ROUNDS, copies_for, dtype_name,
                           measure_copy_bandwidth, measure_gemm_rate, time_per_call)
from fastlayers._backend import fp32_matmul_mode

if ON_GPU and fastlayers.backend_info()["devices"]["cuda"]["path"] != "triton":
    raise RuntimeError(  # fastlayers' figures would be torch's (e.g. a checkout without
        # fastlayers.kernels first on sys.path: run from an install, or --import-mode=append)
        f"benchmarks on a GPU, but CUDA tensors take fastlayers' torch path: "
        f"{fastlayers.backend_info()['devices']['cuda']} (fastlayers from {fastlayers.__file__})")
torch._dynamo.config.cache_size_limit = 64  # one compiled baseline per shape and dtype
GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else \
    (torch.bfloat16, torch.float32)  # CPU fp16 GEMMs are slow and no CPU case uses them


def _measure_ceilings():
    out = {"copy_gbps": measure_copy_bandwidth()}
    for dtype in GEMM_DTYPES:
        out[f"gemm_tflops_{dtype_name(dtype)}"] = measure_gemm_rate(dtype)
    return out


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@pytest.fixture(scope="session")
def ceilings():
    """Device copy bandwidth (GB/s, read+write) and torch's best GEMM rate per dtype
    (TFLOP/s), measured with torch in this run (see bench/harness.py), plus what the run ran
    on. The JSON hook re-measures the rates at the end and keeps the larger of the two."""
    out = _measure_ceilings()
    out["fp32_mode"] = fp32_matmul_mode()
    out["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    out["torch"] = torch.__version__
    out["triton"] = fastlayers.backend_info()["triton"]
    out["threads"] = torch.get_num_threads()
    return out


@functools.lru_cache(maxsize=None)
def _copy_rate_at(nbytes):
    return measure_copy_bandwidth(nbytes)


@pytest.fixture
def record(benchmark, ceilings):
    """record(fn_factory, *, op, variant, pass_, dtype, shape, flops, nbytes):

    fn_factory(i) builds input set i and returns a zero-argument callable doing one call;
    the sets are rotated. ``flops`` and ``nbytes`` (minimal bytes: each input read once,
    each output written once) turn per-call times into TFLOP/s and GB/s. Stores in
    extra_info the per-call time of every round (``rounds_ms``) and their median.
    """

    def run(fn_factory, *, op, variant, pass_, dtype, shape, flops=0, nbytes=0):
        fns = [fn_factory(i) for i in range(copies_for(nbytes))]
        cycle = itertools.cycle(fns)

        def one():
            next(cycle)()

        for _ in range(3):  # warm up: autotune, compile, caches
            one()
        per = min(time_per_call(one, 1) for _ in range(3))
        inner = max(1, min(10_000, int(ROUND_S / max(per, 1e-7))))
        benchmark.extra_info["inner_calls"] = inner
        benchmark.pedantic(lambda: time_per_call(one, inner), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
        median = benchmark.stats.stats.median / inner
        info = benchmark.extra_info
        info.update(op=op, variant=variant, pass_=pass_, dtype=dtype_name(dtype),
                    shape=list(shape), device=ceilings["device"], median_ms=median * 1e3,
                    rounds_ms=[d / inner * 1e3 for d in benchmark.stats.stats.data],
                    flops=flops, nbytes=nbytes, ceilings=ceilings)
        if flops:
            info["tflops"] = flops / median / 1e12
        if nbytes:
            info["gbps"] = nbytes / median / 1e9
            info["copy_gbps_same_size"] = _copy_rate_at(nbytes)
        return median

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Re-measure the ceilings (keep the larger), record the run's environment and give
    every fastlayers result its speedups over each baseline of its case (same run)."""
    from bench.report_stats import OURS, group, speedup

    rows = [b["extra_info"] for b in output_json.get("benchmarks", []) if "op" in b["extra_info"]]
    with_ceilings = [r for r in rows if "ceilings" in r]
    if with_ceilings:
        first = with_ceilings[0]["ceilings"]  # the session's one dict
        for key, value in _measure_ceilings().items():
            first[key] = max(first.get(key, 0.0), value)
        for r in with_ceilings:
            r["ceilings"] = first
    output_json["fastlayers_run"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if ON_GPU else None,
        "torch": torch.__version__, "triton": fastlayers.backend_info()["triton"],
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "rounds": ROUNDS, "round_s": ROUND_S,
        "command": " ".join([f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                             if k.startswith("BENCH_")]
                            + ["pytest", shlex.join(config.invocation_params.args)]),
    }
    for variants in group(rows).values():
        ours = variants.get(OURS)
        if ours is None:
            continue
        ours["speedup"] = {name: speedup(ours, row)["median"]
                           for name, row in variants.items() if name != OURS}
