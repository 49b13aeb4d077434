"""halve_until and FixedHiddenMLP under torch.compile(fullgraph=True, dynamic=True) on CPU
(issue 11): the threshold arrives as a SymFloat and is checked without math.isnan or a
rounding (compile-safe), and the compiled results equal the literal seed loop."""
import math

import pytest
import torch

import fastlayers
from fastlayers import functional as F
from fastlayers.reference import halve_until_loop


def test_halve_until_compiles_dynamic_and_matches_the_loop(backend):
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: F.halve_until(x, t, return_count=True), fullgraph=True,
                      dynamic=True)
    gen = torch.Generator().manual_seed(11)
    for n, t in ((10, 1.0), (33, 0.5), (7, 2.0), (129, 1e-3)):  # new shapes and thresholds
        x = torch.randn(n, generator=gen) * 100
        y, k = f(x.to(backend), t)
        ref, ref_k = halve_until_loop(x, t)
        assert int(k) == ref_k and torch.equal(y.cpu(), ref)


def test_compiled_threshold_checks_still_raise():
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: F.halve_until(x, t), fullgraph=True, dynamic=True)
    x = torch.randn(5)
    f(x, 1.0)
    for bad in (-1.0, math.nan, 0.0):
        with pytest.raises(Exception, match="threshold must be > 0"):
            f(x, bad)
    with pytest.raises(Exception, match="smallest normal"):
        f(x.half(), 1e-6)


def test_fixed_hidden_mlp_module_compiles_dynamic(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastlayers.FixedHiddenMLP().to(backend)
    c = torch.compile(m, fullgraph=True, dynamic=True)
    for B in (2, 5, 7):
        x = torch.randn(B, 20, device=backend)
        with torch.no_grad():
            got, want = c(x), m(x)
        if fastlayers.get_backend() == "triton":  # the same kernels: bitwise
            assert torch.equal(got, want)
        else:  # Inductor compiles torch's own ops (its own fp32 codegen): close, not bitwise
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
