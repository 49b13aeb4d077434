"""Shared machinery for the benchmark suite (``pytest bench/ --benchmark-only``);
the fixtures ``ceilings`` and ``record`` live in bench/conftest.py.

Every case is timed the way a user feels it: ``inner`` back-to-back calls, then one device
synchronisation, so a per-call time is max(host overhead, device time). Inputs rotate
over enough copies to exceed the GPU's L2 cache. Each result's ``extra_info`` carries the
op, variant (ours or a baseline), pass, dtype, shape, work (flops, minimal bytes), the
per-call time of every round, and the ceilings measured in the same run, so
``python -m bench.report`` can print ratios, their spread and % of roofline from the JSON
alone.

Ceilings are upper bounds measured with torch in the same run: the best rate of several
trials of torch's GEMM entry points (``mm``, ``addmm``, ``F.linear``: the baselines' own
paths) over a few square sizes, and the best device copy rate, both taken at the start and
again at the end of the run (the larger wins); plus torch's copy rate at each case's own
byte count (a small working set lives in cache, which a large copy does not show).

``BENCH_THREADS=N`` sets torch's CPU thread count (on a shared CPU, 1 thread keeps the
OpenMP threads of a tiny op from waiting on each other while other processes hold the
cores). ``BENCH_ROUNDS`` / ``BENCH_ROUND_S`` override the rounds and seconds per round.
"""
import math
import os
import time

import torch
import torch.nn.functional as TF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
L2_BYTES = 64 << 20
ROUND_S = float(os.environ.get("BENCH_ROUND_S", 0.02 if ON_GPU else 0.015))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 7))
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


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


def _best_time(fn, inner, trials):
    fn()
    return min(time_per_call(fn, inner) for _ in range(trials))


def measure_copy_bandwidth(nbytes: int = 0, trials: int = 7) -> float:
    """Best device-to-device copy rate in GB/s (bytes read plus bytes written) of a
    ``copy_`` moving ``nbytes`` in all (default: a large copy, 1 GiB on GPU, 128 MiB on
    CPU), over ``trials`` timings."""
    if nbytes <= 0:
        nbytes = (1 << 30) if ON_GPU else (1 << 27)
    n = max(1, nbytes // 8)  # fp32 elements: half the bytes are read, half written
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    inner = max(1, min(1000, int(2e6 / n)))
    per = _best_time(lambda: dst.copy_(src), inner, trials)
    return 2 * n * 4 / per / 1e9


GEMM_SIZES = (2048, 4096, 8192) if ON_GPU else (256, 512)


def measure_gemm_rate(dtype, trials: int = 5) -> float:
    """torch's best square GEMM rate in TFLOP/s for ``dtype`` on random data: the fastest of
    ``torch.mm``, ``torch.addmm`` and ``F.linear`` (the entry points the baselines use) over
    ``GEMM_SIZES``, best of ``trials`` timings each."""
    best = 0.0
    for n in GEMM_SIZES:
        a = torch.randn(n, n, device=DEVICE, dtype=dtype)
        b = torch.randn(n, n, device=DEVICE, dtype=dtype)
        bias = torch.randn(n, device=DEVICE, dtype=dtype)
        for fn in (lambda: torch.mm(a, b), lambda: torch.addmm(bias, a, b),
                   lambda: TF.linear(a, b, bias)):
            per = _best_time(fn, 3 if ON_GPU else 1, trials)
            best = max(best, 2 * n ** 3 / per / 1e12)
    return best


def gpu_or_cpu(gpu_cases, cpu_cases):
    """The parameter list for this machine: GPU sizes on CUDA, small sizes on CPU."""
    return gpu_cases if ON_GPU else cpu_cases


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")
