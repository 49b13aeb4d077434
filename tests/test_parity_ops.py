"""Parity suite, functional ops: every tensor argument in every layout, every dtype, awkward
sizes, forward and backward, on both paths (``backend``: the Triton kernels in the
interpreter, and the torch fallback), against torch's own float64 composites."""
import pytest
import torch
from _parity import (
    DTYPES,
    LAYOUTS,
    SIZES,
    centered64,
    d,
    describe,
    fixed_hidden64,
    linear_relu64,
    make,
)
from _util import REL_TOL, assert_close_to_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlayers import functional as FL

HYP = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])
sizes = st.sampled_from(SIZES)
layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(DTYPES)


def _grad_tol(dtype, k):
    """Gradients sum over a batch/feature dim: 16-bit grad_out rounding adds up."""
    return REL_TOL[dtype] * (4 if dtype in (torch.float16, torch.bfloat16) else 2)


def _check_grads(got, ref, dtype, what):
    for name, g, r in zip(("x", "weight", "bias"), got, ref):
        if r is None:
            assert g is None, f"{what}: grad of {name} should be None"
            continue
        assert g is not None and g.shape == r.shape, f"{what}: grad of {name} shape"
        assert g.dtype == dtype
        assert_close_to_ref(g, r, dtype, tol=_grad_tol(dtype, 0), what=f"{what} d{name}")


@HYP
@given(m=sizes, k=sizes, n=sizes, dtype=dtypes, lx=layouts, lw=layouts, lb=layouts,
       lg=layouts, has_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]),
       seed=st.integers(0, 2 ** 16))
def test_linear_relu_every_layout(backend, m, k, n, dtype, lx, lw, lb, lg, has_bias, lead,
                                  seed):
    torch.manual_seed(seed)
    x = make(lead + (m, k), dtype, lx, backend).requires_grad_()
    w = make((n, k), dtype, lw, backend).requires_grad_()
    b = make((n,), dtype, lb, backend).requires_grad_() if has_bias else None
    y = FL.linear_relu(x, w, b)
    x64, w64, b64 = d(x), d(w), d(b)
    ref = linear_relu64(x64, w64, b64)
    what = f"linear_relu x:{describe(x)} w:{describe(w)} b:{b is not None and describe(b)}"
    assert y.shape == ref.shape and y.dtype == dtype, what
    assert_close_to_ref(y, ref, dtype, what=what)
    g = make(y.shape, dtype, lg, backend)
    got = torch.autograd.grad(y, [x, w] + ([b] if has_bias else []), g, allow_unused=True)
    want = torch.autograd.grad(ref, [x64, w64] + ([b64] if has_bias else []), d(g))
    _check_grads(list(got) + [None] * (3 - len(got)), list(want) + [None] * (3 - len(want)),
                 dtype, what)


@HYP
@given(m=sizes, k=sizes, n=sizes, dtype=dtypes, lx=layouts, lw=layouts, lg=layouts,
       c=st.sampled_from([1.0, -0.5, 0.0, 3]), seed=st.integers(0, 2 ** 16))
def test_fixed_hidden_every_layout(backend, m, k, n, dtype, lx, lw, lg, c, seed):
    torch.manual_seed(seed)
    x = make((m, k), dtype, lx, backend).requires_grad_()
    w = make((k, n), dtype, lw, backend)
    y = FL.fixed_hidden(x, w, c)
    x64 = d(x)
    ref = fixed_hidden64(x64, w.double(), c)
    what = f"fixed_hidden x:{describe(x)} w:{describe(w)} c={c}"
    assert_close_to_ref(y, ref, dtype, what=what)
    g = make(y.shape, dtype, lg, backend)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(ref, x64, d(g))
    assert_close_to_ref(gx, rx, dtype, tol=_grad_tol(dtype, k), what=what + " dx")


@HYP
@given(shape=st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 1, 13), (4, 0, 3), (5, 6, 2)]),
       dtype=dtypes, lx=layouts, lg=layouts, dim=st.sampled_from([None, 0, -1, (0, -1)]),
       seed=st.integers(0, 2 ** 16))
def test_centered_every_layout(backend, shape, dtype, lx, lg, dim, seed):
    torch.manual_seed(seed)
    x = make(shape, dtype, lx, backend, scale=3.0).requires_grad_()
    if dim is not None and len(shape) == 1 and dim == (0, -1):
        dim = 0  # (0, -1) names one dim twice for a 1-D tensor
    y = FL.centered(x, dim)
    x64 = d(x)
    ref = centered64(x64, dim)
    what = f"centered x:{describe(x)} dim={dim}"
    assert y.shape == x.shape and y.dtype == dtype, what
    assert_close_to_ref(y, ref, dtype, tol=REL_TOL[dtype] * 2, what=what)
    g = make(y.shape, dtype, lg, backend)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(ref, x64, d(g))
    assert_close_to_ref(gx, rx, dtype, tol=REL_TOL[dtype] * 2, what=what + " dx")


@pytest.mark.parametrize("make_bias", [
    lambda: torch.randn(5, 3)[:, 1],                      # a column: stride 3
    lambda: torch.randn(1).expand(5),                     # stride 0
    lambda: torch.randn(11)[1::2],                        # step 2, offset 1
    lambda: torch.randn(8)[3:],                           # offset 3
], ids=["column", "expanded", "step", "offset"])
def test_strided_bias_is_read_by_its_strides(backend, make_bias):
    """Issue 9, case 1: the kernels read the bias as contiguous."""
    b = make_bias().to(backend)
    x, w = torch.randn(4, 6, device=backend), torch.randn(5, 6, device=backend)
    ref = linear_relu64(x.double(), w.double(), b.double())
    assert_close_to_ref(FL.linear_relu(x, w, b), ref, torch.float32, what="linear_relu")
    # the same bias through FixedHiddenMLP's one Linear (d = 5)
    xm, wm, rm = torch.randn(3, 5, device=backend), torch.randn(5, 5, device=backend) * 0.3, \
        torch.rand(5, 5, device=backend)
    out, k = FL.fixed_hidden_mlp(xm, wm, b, rm, return_count=True)
    ref = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(xm.double(), wm.double(), b.double())
                   @ rm.double() + 1), wm.double(), b.double()) * 2.0 ** -int(k)
    assert_close_to_ref(out, ref, torch.float32, what="fixed_hidden_mlp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_features_zero_gives_relu_of_bias(backend, dtype):
    """Issue 9, case 4: in_features == 0 is relu(bias) broadcast, as in torch."""
    x = torch.randn(3, 0, dtype=dtype, device=backend, requires_grad=True)
    w = torch.randn(4, 0, dtype=dtype, device=backend, requires_grad=True)
    b = torch.randn(4, dtype=dtype, device=backend, requires_grad=True)
    y = FL.linear_relu(x, w, b)
    ref = torch.relu(b.detach()).expand(3, 4)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (4, 0)
    assert torch.equal(b.grad, (b.detach() > 0).to(dtype) * 3)
    z = FL.fixed_hidden(torch.randn(2, 0, device=backend, dtype=dtype),
                        torch.rand(0, 3, device=backend, dtype=dtype), 0.5)
    assert torch.equal(z, torch.full((2, 3), 0.5, dtype=dtype))
    w0 = torch.zeros(4, 0, dtype=dtype, device=backend)
    empty3 = torch.randn(2, 0, 0, dtype=dtype, device=backend)
    assert FL.linear_relu(empty3, w0).shape == (2, 0, 4)


def test_in_features_zero_compiles(backend):
    """Issue 9, case 4 under torch.compile (reshape(-1, 0) is ambiguous)."""
    x, w, b = torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    fn = torch.compile(FL.linear_relu, fullgraph=True)
    assert torch.equal(fn(x.to(backend), w.to(backend), b.to(backend)),
                       torch.relu(b).expand(3, 4))


@pytest.mark.parametrize("op", ["linear_relu", "fixed_hidden", "centered", "fixed_hidden_mlp"])
def test_autocast_leaves_float64_alone(backend, op):
    """Issue 9, case 5: F.linear leaves float64 inputs alone under autocast; so do we."""
    x = torch.randn(3, 5, dtype=torch.float64, device=backend)
    w = torch.randn(5, 5, dtype=torch.float64, device=backend)
    b = torch.randn(5, dtype=torch.float64, device=backend)
    calls = {
        "linear_relu": (lambda: FL.linear_relu(x, w, b), lambda: linear_relu64(x, w, b)),
        "fixed_hidden": (lambda: FL.fixed_hidden(x, w.abs()), lambda: fixed_hidden64(x, w.abs())),
        "centered": (lambda: FL.centered(x), lambda: centered64(x)),
        "fixed_hidden_mlp": (lambda: FL.fixed_hidden_mlp(x, w * 0.3, b, w.abs()),
                             lambda: FL.fixed_hidden_mlp(x, w * 0.3, b, w.abs())),
    }
    ours, theirs = calls[op]
    expected = theirs()
    with torch.autocast(backend if backend != "cuda" else "cuda", dtype=torch.bfloat16):
        got = ours()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_autocast_casts_float32_like_torch(backend):
    x, w, b = (torch.randn(4, 6, device=backend), torch.randn(3, 6, device=backend),
               torch.randn(3, device=backend))
    with torch.autocast("cpu" if backend == "cpu" else "cuda", dtype=torch.bfloat16):
        got = FL.linear_relu(x, w, b)
        want = torch.relu(torch.nn.functional.linear(x, w, b))
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close_to_ref(got, linear_relu64(x.bfloat16().double(), w.bfloat16().double(),
                                           b.bfloat16().double()), torch.bfloat16)
