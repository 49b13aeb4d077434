"""Centering (the seed's CenteredLayer, x - x.mean()) vs torch eager and torch.compile;
forward and forward+backward. GB/s count minimal bytes: 2N for the forward (read x, write
y), 4N with the backward (also read dy, write dx)."""
import pytest
import torch

from fastlayers import functional as F

from bench.harness import DEVICE, ON_GPU, dtype_name, gpu_or_cpu

# 2**16: launch-bound; 2**22: fits in L2 (the one-launch path); 2**28: HBM-bound (two passes).
SIZES = gpu_or_cpu([2 ** 16, 2 ** 22, 2 ** 28], [2 ** 12, 2 ** 16])
DTYPES = [torch.float32, torch.bfloat16]


def _eager(x):
    return x - x.mean()


VARIANTS = {"fastlayers": F.centered, "eager": _eager}
if ON_GPU:  # on CPU the suite compares the fallback with eager only (compiles take minutes)
    VARIANTS["compile"] = torch.compile(_eager, dynamic=False)
CASES = [(p, v) for p in ("fwd", "fwd+bwd") for v in VARIANTS]


@pytest.mark.parametrize("pass_, variant", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
def test_centered(record, n, dtype, pass_, variant):
    fn = VARIANTS[variant]
    backward = pass_ == "fwd+bwd"

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(n, device=DEVICE, dtype=dtype, generator=g) + 0.5
        if not backward:
            return lambda: fn(x)
        x.requires_grad_(True)
        gy = torch.randn(n, device=DEVICE, dtype=dtype, generator=g)
        return lambda: torch.autograd.grad(fn(x), (x,), gy)

    elsize = torch.empty((), dtype=dtype).element_size()
    record(make, op="centered", variant=variant, pass_=pass_, dtype=dtype, shape=(n,),
           nbytes=(4 if backward else 2) * n * elsize)


ROWS = gpu_or_cpu([(4096, 4096), (64, 2 ** 20)], [(256, 256)])


@pytest.mark.parametrize("variant", ["fastlayers", "eager"])
@pytest.mark.parametrize("shape", ROWS, ids=lambda s: "x".join(map(str, s)))
def test_centered_rows(record, shape, variant):
    """Per-row centering (dim=-1): the one-sweep segment kernel (4096 wide rows) and the
    split path (64 long rows, fewer than the SM count)."""
    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(*shape, device=DEVICE, generator=g)
        if variant == "fastlayers":
            return lambda: F.centered(x, -1)
        return lambda: x - x.mean(-1, keepdim=True)

    record(make, op="centered_rows", variant=variant, pass_="fwd", dtype=torch.float32,
           shape=shape, nbytes=2 * shape[0] * shape[1] * 4)
