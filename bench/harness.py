"""Shared machinery for the benchmark suite (``pytest bench/ --benchmark-only``);
the fixtures ``ceilings`` and ``record`` live in bench/conftest.py.

Every case is timed the way a user feels it: ``inner`` back-to-back calls, then one device
synchronisation, so a per-call time is max(host overhead, device time). Inputs rotate
over enough copies to exceed the GPU's L2 cache. Each result's ``extra_info`` carries the
op, variant (ours or a baseline), pass, dtype, shape, per-call median, TFLOP/s, GB/s on
minimal bytes and the ceilings measured in the same run, so ``python -m bench.report``
can print ratios and % of roofline from the JSON alone; bench/conftest.py adds each
fastlayers result's speedup over every baseline of its case to the JSON.
"""
import math
import os
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
L2_BYTES = 64 << 20
ROUND_S = 0.02 if ON_GPU else 0.03
ROUNDS = 7 if ON_GPU else 3


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def copies_for(nbytes: int) -> int:
    """How many input sets to rotate over so repeated calls do not run from L2."""
    if not ON_GPU or nbytes <= 0:
        return 1
    return max(1, min(8, math.ceil(3 * L2_BYTES / nbytes)))


def time_per_call(fn, inner):
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - t0) / inner


def measure_copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    n = (1 << 28) if ON_GPU else (1 << 24)
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    per = min(time_per_call(lambda: dst.copy_(src), 10 if ON_GPU else 2) for _ in range(5))
    return 2 * n * 4 / per / 1e9


def measure_gemm_rate(dtype) -> float:
    """torch's (cuBLAS's) square GEMM rate in TFLOP/s for ``dtype`` on random data."""
    n = 8192 if ON_GPU else 512
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    a @ b
    per = min(time_per_call(lambda: a @ b, 3 if ON_GPU else 1) for _ in range(5))
    return 2 * n ** 3 / per / 1e12


def gpu_or_cpu(gpu_cases, cpu_cases):
    """The parameter list for this machine: GPU sizes on CUDA, small sizes on CPU."""
    return gpu_cases if ON_GPU else cpu_cases


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")
