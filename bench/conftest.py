"""pytest fixtures of the benchmark suite: ``ceilings`` (measured once per run) and
``record`` (times one case and stores everything the report needs in extra_info)."""
import itertools

import pytest
import torch

import fastlayers
from bench.harness import (ON_GPU, ROUND_S, ROUNDS, copies_for, dtype_name,
                           measure_copy_bandwidth, measure_gemm_rate, time_per_call)
from fastlayers._backend import fp32_matmul_mode

torch._dynamo.config.cache_size_limit = 64  # one compiled baseline per shape and dtype


@pytest.fixture(scope="session")
def ceilings():
    """Device copy bandwidth (GB/s, read+write) and GEMM rate per dtype (TFLOP/s), measured
    once per run with torch so every ratio in a report comes from the same run."""
    out = {"copy_gbps": measure_copy_bandwidth()}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out[f"gemm_tflops_{dtype_name(dtype)}"] = measure_gemm_rate(dtype)
    out["fp32_mode"] = fp32_matmul_mode()
    out["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    out["torch"] = torch.__version__
    info = fastlayers.backend_info()
    out["triton"] = info["triton"]
    return out


@pytest.fixture
def record(benchmark, ceilings):
    """record(fn_factory, *, op, variant, pass_, dtype, shape, flops, nbytes):

    fn_factory(i) builds input set i and returns a zero-argument callable doing one call;
    the sets are rotated. ``flops`` and ``nbytes`` (minimal bytes: each input read once,
    each output written once) turn the per-call median into TFLOP/s and GB/s.
    """

    def run(fn_factory, *, op, variant, pass_, dtype, shape, flops=0, nbytes=0):
        fns = [fn_factory(i) for i in range(copies_for(nbytes))]
        cycle = itertools.cycle(fns)

        def one():
            next(cycle)()

        for _ in range(3):  # warm up: autotune, compile, caches
            one()
        per = time_per_call(one, 1)
        inner = max(1, min(10_000, int(ROUND_S / max(per, 1e-7))))
        benchmark.extra_info["inner_calls"] = inner
        benchmark.pedantic(lambda: time_per_call(one, inner), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
        median = benchmark.stats.stats.median / inner
        info = benchmark.extra_info
        info.update(op=op, variant=variant, pass_=pass_, dtype=dtype_name(dtype),
                    shape=list(shape), device=ceilings["device"], median_ms=median * 1e3,
                    ceilings=ceilings)
        if flops:
            info["tflops"] = flops / median / 1e12
        if nbytes:
            info["gbps"] = nbytes / median / 1e9
            info["pct_copy_bw"] = 100 * info["gbps"] / ceilings["copy_gbps"]
        rate = ceilings.get(f"gemm_tflops_{dtype_name(dtype)}")
        if flops and rate:
            info["pct_gemm_rate"] = 100 * info["tflops"] / rate
        return median

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Give every fastlayers result the speedup over each baseline of its case (baseline
    time / ours, same run), so the JSON alone carries the ratios."""
    from bench.report import OURS, group

    rows = [b["extra_info"] for b in output_json.get("benchmarks", []) if "op" in b["extra_info"]]
    for variants in group(rows).values():
        ours = variants.get(OURS)
        if ours is None:
            continue
        ours["speedup"] = {name: row["median_ms"] / ours["median_ms"]
                           for name, row in variants.items() if name != OURS}
