"""Numerics of the halving op that a plausible bug would break silently (issue 16): the
bf16 rounding of the halving sum (ties to even, as torch rounds its fp32-accumulated sum)
and the gradient factor 2**-k for every k, subnormal and beyond."""
import math

import pytest
import torch

from fastlayers import functional as F
from fastlayers.ops import halve_until as H
from fastlayers.reference import halve_until_loop


@pytest.mark.parametrize("values, threshold, expected_k", [
    ([1.0, 2.0 ** -8], 1.0, 0),  # sum 1 + 2**-8: a tie, to even 1.0 (away: 1 + 2**-7)
    ([1.0, 3 * 2.0 ** -8], 1.0078125, 1),  # 1 + 3 * 2**-8: a tie, to even 1 + 2**-6
    ([0.5, 2.0 ** -10, 2.0 ** -10], 0.5, 0),  # 0.5 + 2**-9: a tie, to even 0.5
    ([96.0, 0.25], 96.0, 0),  # 96.25: a tie between 96 and 96.5, to even 96
])
def test_bf16_sum_rounds_ties_to_even_like_torch(backend, values, threshold, expected_k):
    """The fp32 sum of these bf16 values is a tie between two bf16 numbers on either side
    of the threshold: the count depends on rounding it half to even."""
    x = torch.tensor(values, dtype=torch.bfloat16)
    bits = int(torch.tensor(sum(values), dtype=torch.float32).view(torch.int32))
    assert bits & 0xFFFF == 0x8000  # exactly halfway between two bf16 numbers
    y, k = F.halve_until(x.to(backend), threshold, return_count=True)
    ref, ref_k = halve_until_loop(x, threshold)
    assert ref_k == expected_k and int(k) == ref_k
    assert torch.equal(y.cpu(), ref)


KS = [0, 1, 23, 126, 127, 128, 133, 140, 149, 150, 151, 200, 275, 276, 277, 278, 300, 600]


def _exact_scaled(g, k):
    """g * 2**-k rounded once to g's dtype (float64 holds every product exactly here)."""
    if k == H.K_FOREVER:
        return g * 0
    if g.dtype == torch.float64:
        return torch.tensor([math.ldexp(v, -k) for v in g.tolist()], dtype=torch.float64)
    return (g.double() * 2.0 ** -k).to(g.dtype)


@pytest.mark.parametrize("scale", [H.scale_grad, H.scale_grad_on_device],
                         ids=["host-k", "device-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_grad_is_g_times_two_to_minus_k_rounded_once(dtype, scale):
    """Both formulas: a CPU k read on the host (one multiply while 2**-k is normal), and
    the tensor-only one every CUDA k takes."""
    gen = torch.Generator().manual_seed(16)
    g = torch.randn(400, dtype=torch.float64, generator=gen) * torch.exp(
        torch.randn(400, dtype=torch.float64, generator=gen) * 25)
    # and the largest binade: g * 2**-k stays nonzero up to k = 277 in fp32/bf16
    g = torch.cat([g, torch.tensor([1.5 * 2.0 ** 127, -2.0 ** 127, 1.75 * 2.0 ** 127],
                                   dtype=torch.float64)]).to(dtype)
    g = g[torch.isfinite(g) & (g != 0)]
    for k in KS + [275, 276, 277, 1021, 1022, 1023, 1074, 1075, H.K_FOREVER]:
        got = scale(g, torch.tensor(k, dtype=torch.int32))
        want = _exact_scaled(g, k)
        assert got.dtype == dtype
        assert torch.equal(got, want), f"k={k}: {int((got != want).sum())} of {g.numel()} differ"


@pytest.mark.parametrize("exponent", [100, 125, 126, 127])
def test_gradient_for_large_counts(backend, exponent):
    """x = 1.5 * 2**exponent takes exponent + 1 halvings to reach 1; its gradient factor
    2**-(exponent + 1) is a subnormal fp32 number, not 0."""
    x = torch.tensor([1.5 * 2.0 ** exponent, -3.0], device=backend).requires_grad_(True)
    y, k = F.halve_until(x, return_count=True)
    assert int(k) == halve_until_loop(x.detach().cpu())[1] == exponent + 1
    g = torch.tensor([0.75, -3.0], device=backend)
    y.backward(g)
    want = (g.double() * 2.0 ** -int(k)).float()
    assert torch.equal(x.grad, want) and bool((want != 0).all())


def test_k_forever_is_one_value_in_ops_and_kernels():
    """K_FOREVER is written twice (ops must import without triton): one value."""
    from fastlayers.ops import halve_until as ops_halve
    kernels = pytest.importorskip("fastlayers.kernels.halve_until",
                                  reason="triton is not installed")
    assert ops_halve.K_FOREVER == kernels.K_FOREVER == 2 ** 31 - 1


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_vmap_counts_each_sample_in_its_own_summation_order(backend, layout):
    """vmap over a batch dim that is not outermost (columns: in_dims=1, each sample a
    strided column) or is (rows: in_dims=0 of a contiguous copy): the count must come from
    the sample's sum as the loop on that sample adds it (``x.abs()`` of a strided column is
    contiguous), not in the batched reduction's column order. The threshold is exactly the
    sample's own first sum, so the loop stops at once (k = 0); a sum added in another order
    can land one rounding above it and halve once."""
    X = torch.tensor([[0.24650228023529053, -0.4717024266719818],
                      [-1.5183908939361572, -0.21238605678081512],
                      [0.5660322308540344, -1.6636672019958496],
                      [0.3338240087032318, 1.6051437854766846],
                      [-0.691939651966095, -0.5398714542388916],
                      [-0.9584746360778809, -0.5706092119216919],
                      [-0.5433818101882935, -0.43469369411468506],
                      [0.40363991260528564, -0.3977137804031372]])
    gen = torch.Generator().manual_seed(5)
    for X in [X] + [torch.randn(n, 3, generator=gen) for n in (8, 33, 100, 257)]:
        X = X.to(backend)  # [n, B]: sample j is X[:, j]
        batched, in_dims = (X, 1) if layout == "columns" else (X.t().contiguous(), 0)
        for j in range(X.shape[1]):
            t = float(X[:, j].abs().sum())
            y, k = halve_until_loop(X[:, j], t)
            ys, ks = torch.func.vmap(lambda v: F.halve_until(v, t, return_count=True),
                                     in_dims=in_dims)(batched)
            assert k == 0 and int(ks[j]) == 0, (tuple(X.shape), j, int(ks[j]))
            assert torch.equal(ys[j], y)
