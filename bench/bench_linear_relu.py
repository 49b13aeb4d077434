"""LinearReLU vs torch eager F.relu(F.linear), cuBLASLt's fused epilogue
(torch._addmm_activation) and torch.compile; forward and forward+backward."""
import pytest
import torch
import torch.nn.functional as TF

from fastlayers import functional as F

from bench.harness import DEVICE, ON_GPU, dtype_name, gpu_or_cpu

SHAPES = gpu_or_cpu(
    [(8192, 4096, 4096), (65536, 256, 256), (262144, 64, 64), (2, 64, 8)],
    [(512, 256, 256), (4096, 64, 64), (2, 64, 8)],
)
DTYPES = [torch.bfloat16, torch.float32]


def _eager(x, w, b):
    return TF.relu(TF.linear(x, w, b))


def _cublaslt(x, w, b):
    return torch._addmm_activation(b, x, w.t())


VARIANTS = {"fastlayers": F.linear_relu, "eager": _eager}
if ON_GPU:  # on CPU the suite compares the fallback with eager only (compiles take minutes)
    VARIANTS.update(cublaslt=_cublaslt, compile=torch.compile(_eager, dynamic=False))
# torch._addmm_activation has no autograd formula: forward only.
CASES = [(p, v) for p in ("fwd", "fwd+bwd") for v in VARIANTS
         if not (p == "fwd+bwd" and v == "cublaslt")]


def _bytes(M, K, N, elsize, backward):
    fwd = M * K + N * K + N + M * N
    bwd = (M * N * 2 + M * K + N * K) + (M * K + N * K + N)  # read gy, y, x, w; write grads
    return (fwd + (bwd if backward else 0)) * elsize


@pytest.mark.parametrize("pass_, variant", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_relu(record, shape, dtype, pass_, variant):
    M, K, N = shape
    fn = VARIANTS[variant]
    backward = pass_ == "fwd+bwd"

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
        w = torch.randn(N, K, device=DEVICE, dtype=dtype, generator=g) * K ** -0.5
        b = torch.randn(N, device=DEVICE, dtype=dtype, generator=g)
        if not backward:
            return lambda: fn(x, w, b)
        x.requires_grad_(True)
        w.requires_grad_(True)
        b.requires_grad_(True)
        gy = torch.randn(M, N, device=DEVICE, dtype=dtype, generator=g)
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), gy)

    flops = 2 * M * N * K * (3 if backward else 1)
    record(make, op="linear_relu", variant=variant, pass_=pass_, dtype=dtype, shape=shape,
           flops=flops, nbytes=_bytes(M, K, N, torch.empty((), dtype=dtype).element_size(),
                                      backward))


@pytest.mark.parametrize("variant", ["fastlayers", "eager"])
def test_linear_relu_module_2x64x8(record, variant):
    """Host overhead of one module call, the issue's CPU goal: fastlayers.LinearReLU vs
    nn.Linear followed by nn.ReLU (module calls, not functional ones)."""
    import fastlayers

    def make(i):
        x = torch.randn(2, 64, device=DEVICE)
        if variant == "fastlayers":
            layer = fastlayers.LinearReLU(64, 8, device=DEVICE)
            return lambda: layer(x)
        lin, act = torch.nn.Linear(64, 8, device=DEVICE), torch.nn.ReLU()
        return lambda: act(lin(x))

    record(make, op="linear_relu_module", variant=variant, pass_="fwd", dtype=torch.float32,
           shape=(2, 64, 8), flops=2 * 2 * 64 * 8, nbytes=(2 * 64 + 8 * 64 + 8 + 2 * 8) * 4)
