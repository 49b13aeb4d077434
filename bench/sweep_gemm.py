"""Sweep launch configs of the fused GEMM on a GPU: ``python -m bench.sweep_gemm``.

For each key Linear+ReLU forward shape, times the pointer and TMA kernels under a few
configs against torch (eager and cuBLASLt's fused epilogue) with triton's do_bench
(median, CUDA events), and prints one line per variant: a tuning aid, not a test.
"""
import sys

import torch
import torch.nn.functional as TF
from triton.testing import do_bench

from fastlayers.kernels.gemm import fused_gemm, heuristic_config

CASES = [
    (8192, 4096, 4096, torch.bfloat16), (65536, 256, 256, torch.bfloat16),
    (262144, 64, 64, torch.bfloat16), (8192, 4096, 4096, torch.float32),
]
CONFIGS = {
    2: [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4), (128, 64, 64, 4, 3), (256, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
    4: [(128, 128, 32, 8, 3), (128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (64, 128, 32, 4, 4)],
}


def main(argv):
    only = argv[1] if len(argv) > 1 else None
    for M, K, N, dtype in CASES:
        name = f"{M}x{K}x{N} {str(dtype)[6:]}"
        if only and only not in name:
            continue
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
        b = torch.randn(N, device="cuda", dtype=dtype)
        flop, nbytes = 2 * M * N * K, (M * K + N * K + M * N) * x.element_size()

        def show(label, fn):
            try:
                ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                print(f"{name:22s} {label:34s} {ms * 1e3:9.1f} us {flop / ms / 1e9:7.1f} TF/s "
                      f"{nbytes / ms / 1e6:7.0f} GB/s", flush=True)
            except Exception as exc:  # a config that does not compile is a line, not a stop
                print(f"{name:22s} {label:34s} FAILED {type(exc).__name__}: {str(exc)[:80]}")

        show("eager relu(linear)", lambda: TF.relu(TF.linear(x, w, b)))
        show("cublasLt _addmm_activation", lambda: torch._addmm_activation(b, x, w.t()))
        heur = heuristic_config(M, N, K, x.element_size())
        for path in ("tma", "pointer"):
            show(f"{path} heuristic", lambda: fused_gemm(x, w.t(), bias=b, relu=True, path=path))
            if path == "pointer":
                continue  # the full sweep runs on the TMA kernel (the default for these)
            for bm, bn, bk, nw, ns in CONFIGS[x.element_size()]:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw,
                           num_stages=ns)
                if cfg == heur or (N <= 64 and bn > 64):
                    continue
                show(f"{path} {bm}x{bn}x{bk} w{nw} s{ns}",
                     lambda: fused_gemm(x, w.t(), bias=b, relu=True, path=path, config=cfg))


if __name__ == "__main__":
    main(sys.argv)
