"""torch.compile(fullgraph=True, dynamic=True) of every fastlayers module on CPU: the eager
outputs (and input gradients) for two batch sizes, one compiled graph for both; and
torch.export with a dynamic batch dim, on both paths."""
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.tour import seed as _seed


def _lazy():
    m = fastlayers.LazyLinearReLU(6)
    m(torch.randn(2, 9))
    return m


MODULES = {
    "LinearReLU": (lambda: fastlayers.LinearReLU(9, 7), 9),
    "LazyLinearReLU": (_lazy, 9),
    "MyLinear": (lambda: fastlayers.MyLinear(9, 5), 9),
    "CenteredLayer": (lambda: fastlayers.CenteredLayer(), 7),
    # 5x8 and 8x8: the eager CPU path takes a one-op formula for power-of-two sizes only;
    # a symbolic size must not guard on that (one graph for both batches)
    "CenteredLayer-pow2": (lambda: fastlayers.CenteredLayer(), 8),
    "CenteredLayer-dim": (lambda: fastlayers.CenteredLayer(dim=-1), 7),
    "FixedHiddenMatmul": (lambda: fastlayers.FixedHiddenMatmul(9, 6), 9),
    "FixedHiddenMLP": (lambda: fastlayers.FixedHiddenMLP(20), 20),
    "FixedHiddenMLP-sum": (lambda: fastlayers.FixedHiddenMLP(20, reduce="sum"), 20),
    "NestMLP": (lambda: fastlayers.NestMLP(), 20),
    "MySequential": (lambda: fastlayers.MySequential(
        fastlayers.LinearReLU(9, 8), fastlayers.CenteredLayer(), nn.Linear(8, 3)), 9),
    "fuse(NestMLP)": (lambda: fastlayers.fuse(_seed.NestMLPEager()), 20),
}
# Backward is compiled too for these (each compile costs seconds on a 2-core CPU).
WITH_GRAD = {"LinearReLU", "MyLinear", "CenteredLayer-dim", "FixedHiddenMatmul",
             "FixedHiddenMLP", "FixedHiddenMLP-sum", "MySequential"}


@pytest.mark.parametrize("name", list(MODULES))
def test_compile_dynamic_matches_eager(name):
    factory, features = MODULES[name]
    module = factory()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (5, 8):
            x = torch.randn(batch, features).mul_(2)
            grad = name in WITH_GRAD
            x1, x2 = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                want, got = module(x1), compiled(x2)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            if not grad:
                continue
            g = torch.randn_like(want)
            want.backward(g)
            got.backward(g)
            torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


EXPORTED = ["LinearReLU", "MyLinear", "CenteredLayer", "CenteredLayer-pow2", "CenteredLayer-dim",
            "FixedHiddenMatmul"]


@pytest.mark.parametrize("name", EXPORTED)
def test_export_with_a_dynamic_batch_matches_eager(backend, name):
    """torch.export at batch 5 with batch dynamic, run at 8 and 3 (the kernel path
    exports the custom ops, which run the kernels again)."""
    factory, features = MODULES[name]
    module = factory().to(backend)
    x = torch.randn(5, features, device=backend)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (8, 3):
        x = torch.randn(batch, features, device=backend).mul_(2)
        torch.testing.assert_close(program.module()(x), module(x), rtol=1e-5, atol=1e-6)
