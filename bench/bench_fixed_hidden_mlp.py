"""FixedHiddenMLP (d=20, fp32) vs a literal copy of the seed's module (eager; its halving
loop syncs once per iteration) and torch.compile of it; forward and forward+backward.
Also the fixed-hidden matmul relu(x @ W + 1) alone vs eager and torch.compile.
GB/s count minimal bytes (read x, write y; with the backward also read dy, write dx)."""
import pytest
import torch
import torch.nn.functional as TF

import fastlayers
from fastlayers import functional as F, reference
from fastlayers.tour.seed import FixedHiddenMLPEager as SeedFixedHiddenMLP

from bench.harness import DEVICE, ON_GPU, dtype_name, gpu_or_cpu

BATCHES = gpu_or_cpu([2, 4096, 2 ** 20], [2, 4096])
D = 20


def _modules():
    torch.manual_seed(0)
    seed = SeedFixedHiddenMLP().to(DEVICE)
    seed.rand_weight = seed.rand_weight.to(DEVICE)
    ours = fastlayers.FixedHiddenMLP.from_seed(seed)
    return {"fastlayers": ours, "seed": seed}


VARIANTS = ["fastlayers", "seed"] + (["compile"] if ON_GPU else [])
CASES = [(p, v) for p in ("fwd", "fwd+bwd") for v in VARIANTS]


@pytest.mark.parametrize("pass_, variant", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("B", BATCHES)
def test_fixed_hidden_mlp(record, B, pass_, variant):
    mods = _modules()
    module = mods["seed" if variant == "compile" else variant]
    fn = torch.compile(module, dynamic=False) if variant == "compile" else module
    backward = pass_ == "fwd+bwd"

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(B, D, device=DEVICE, generator=g)
        if not backward:
            def run():
                with torch.no_grad():
                    return fn(x)
            return run
        x.requires_grad_(True)
        gy = torch.randn(B, D, device=DEVICE, generator=g)
        inputs = (x, module.linear.weight, module.linear.bias)
        return lambda: torch.autograd.grad(fn(x), inputs, gy)

    nbytes = (4 if backward else 2) * B * D * 4 + (2 * D * D + D) * 4
    flops = 3 * 2 * B * D * D * (3 if backward else 1)
    record(make, op="fixed_hidden_mlp", variant=variant, pass_=pass_, dtype=torch.float32,
           shape=(B, D), flops=flops, nbytes=nbytes)


FH_SHAPES = gpu_or_cpu([(65536, 256, 256)], [(4096, 64, 64)])
FH_VARIANTS = ["fastlayers", "eager"] + (["compile"] if ON_GPU else [])


def _eager_fixed_hidden(x, w):
    return TF.relu(torch.mm(x, w) + 1)


_compiled_fixed_hidden = torch.compile(_eager_fixed_hidden, dynamic=False) if ON_GPU else None


@pytest.mark.parametrize("variant", FH_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", FH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fixed_hidden(record, shape, dtype, variant):
    M, K, N = shape
    fn = {"fastlayers": F.fixed_hidden, "eager": _eager_fixed_hidden,
          "compile": _compiled_fixed_hidden}[variant]

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
        w = (torch.rand(K, N, device=DEVICE, generator=g) * K ** -0.5).to(dtype)
        return lambda: fn(x, w)

    elsize = torch.empty((), dtype=dtype).element_size()
    record(make, op="fixed_hidden", variant=variant, pass_="fwd", dtype=dtype, shape=shape,
           flops=2 * M * N * K, nbytes=(M * K + K * N + M * N) * elsize)


HU_SHAPES = gpu_or_cpu([(2 ** 20, 20)], [(64, 20), (4096, 20)])


@pytest.mark.parametrize("variant", ["fastlayers", "seed"])
@pytest.mark.parametrize("shape", HU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_halve_until_relu_input(record, shape, variant):
    """The halving loop alone on a ReLU output (about half exact zeros) vs the seed's loop
    (``reference.halve_until_loop``: one host sync per halving)."""
    fn = F.halve_until if variant == "fastlayers" else reference.halve_until_loop

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.relu(torch.randn(shape, device=DEVICE, generator=g) * 30)
        return lambda: fn(x)

    n = shape[0] * shape[1]
    record(make, op="halve_until", variant=variant, pass_="fwd", dtype=torch.float32,
           shape=shape, flops=0, nbytes=2 * n * 4)
