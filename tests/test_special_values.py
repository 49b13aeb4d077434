"""Special values (NaN, +-inf, -0.0, subnormals) through every op, forward and backward, on
both paths, against torch's own float64 composite (F.linear + relu, x - x.mean(), the seed's
halving loop) run by torch's autograd.

NaN and inf positions must match the reference exactly (ReLU keeps NaN; the ReLU gradient
passes dy where the output is NaN, like torch's threshold_backward); finite values within
the tolerance of an fp32 computation.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers.functional as FL

SUBNORMAL = {torch.float32: 1e-40, torch.float16: 1e-6, torch.float64: 1e-310}
VALUES = ["nan", "inf", "-inf", "-0.0", "subnormal"]
FOREVER = 2**31 - 1  # halve_until's count for an input that never stops halving


def _special(value: str, dtype) -> float:
    return SUBNORMAL[dtype] if value == "subnormal" else float(value)


def _plant(t: torch.Tensor, value: str, *spots) -> torch.Tensor:
    """A copy of t with ``value`` at the given flat indices (a few, never all)."""
    t = t.detach().clone()
    flat = t.view(-1)
    for i in spots:
        flat[i % flat.numel()] = _special(value, t.dtype)
    return t


def _assert_same(actual, ref, what, atol=1e-4, rtol=1e-4):
    """NaN, +inf and -inf at exactly the same places; finite values close."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != {tuple(r.shape)}"
    assert torch.equal(a.isnan(), r.isnan()), (
        f"{what}: NaN at {a.isnan().nonzero().tolist()}, reference {r.isnan().nonzero().tolist()}")
    for sign in (1, -1):
        assert torch.equal(a == sign * math.inf, r == sign * math.inf), f"{what}: {sign:+}inf differs"
    fin = r.isfinite()
    torch.testing.assert_close(a[fin], r[fin], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _leaves(device, dtype, **tensors):
    """(kernel-side leaves in dtype on device, float64 CPU leaves): same values."""
    ours = {k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_()
            for k, v in tensors.items()}
    ref = {k: None if v is None else v.detach().cpu().double().requires_grad_()
           for k, v in ours.items()}
    return ours, ref


def _grads(out, leaves, grad_out):
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    gs = torch.autograd.grad(out, [leaves[k] for k in names], grad_out)
    return dict(zip(names, gs))


def _check_fwd_bwd(y, y_ref, ours, ref, grad_out, what):
    _assert_same(y, y_ref, f"{what} forward")
    g = _grads(y, ours, grad_out.to(y.device, y.dtype))
    g_ref = _grads(y_ref, ref, grad_out.double())
    for k in g_ref:
        _assert_same(g[k], g_ref[k], f"{what} grad {k}")


# ------------------------------------------------------------------------ linear_relu
@pytest.mark.parametrize("where", ["x", "weight", "bias", "grad_out"])
@pytest.mark.parametrize("value", VALUES)
def test_linear_relu(backend, where, value):
    M, K, N = 5, 7, 3
    t = dict(x=torch.randn(M, K), weight=torch.randn(N, K), bias=torch.randn(N))
    grad_out = torch.randn(M, N)
    if where == "grad_out":
        grad_out = _plant(grad_out, value, 4)
    else:
        t[where] = _plant(t[where], value, 4)
    ours, ref = _leaves(backend, torch.float32, **t)
    y = FL.linear_relu(ours["x"], ours["weight"], ours["bias"])
    y_ref = torch.relu(F.linear(ref["x"], ref["weight"], ref["bias"]))
    _check_fwd_bwd(y, y_ref, ours, ref, grad_out, f"linear_relu {value} in {where}")


def test_linear_relu_nan_output_passes_gradient(backend):
    """A NaN pre-activation gives a NaN output whose gradient flows (torch's rule), so the
    weight gradient's row for that output is finite and equal to torch's."""
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    b = torch.tensor([math.nan, 0.5, -0.25])
    ours, ref = _leaves(backend, torch.float32, x=x, weight=w, bias=b)
    y = FL.linear_relu(ours["x"], ours["weight"], ours["bias"])
    assert y[:, 0].isnan().all()
    grad_out = torch.rand(4, 3) + 0.5
    g = _grads(y, ours, grad_out.to(y.device))
    assert g["weight"][0].isfinite().all() and (g["weight"][0] != 0).any()
    g_ref = _grads(torch.relu(F.linear(ref["x"], ref["weight"], ref["bias"])), ref, grad_out.double())
    for k in g_ref:
        _assert_same(g[k], g_ref[k], f"grad {k}")


@pytest.mark.parametrize("value", VALUES)
def test_linear_relu_fp16(backend, value):
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    x = _plant(x, value, 3, 17)
    ours, ref = _leaves(backend, torch.float16, x=x, weight=w, bias=b)
    y = FL.linear_relu(ours["x"], ours["weight"], ours["bias"])
    y_ref = torch.relu(F.linear(ref["x"], ref["weight"], ref["bias"]))
    _assert_same(y, y_ref, f"fp16 linear_relu {value}", atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------ centered
@pytest.mark.parametrize("dim", [None, -1])
@pytest.mark.parametrize("where", ["x", "grad_out"])
@pytest.mark.parametrize("value", VALUES)
def test_centered(backend, dim, where, value):
    x, grad_out = torch.randn(4, 9), torch.randn(4, 9)
    if where == "x":
        x = _plant(x, value, 11)
    else:
        grad_out = _plant(grad_out, value, 11)
    ours, ref = _leaves(backend, torch.float32, x=x)

    def center(v):
        return v - (v.mean() if dim is None else v.mean(dim, keepdim=True))
    _check_fwd_bwd(FL.centered(ours["x"], dim), center(ref["x"]), ours, ref, grad_out,
                   f"centered(dim={dim}) {value} in {where}")


# ------------------------------------------------------------------------ fixed_hidden
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("value", VALUES)
def test_fixed_hidden(backend, where, value):
    x, w, grad_out = torch.randn(5, 6), torch.randn(6, 3), torch.randn(5, 3)
    if where == "x":
        x = _plant(x, value, 7)
    elif where == "weight":
        w = _plant(w, value, 4)
    else:
        grad_out = _plant(grad_out, value, 4)
    ours, ref = _leaves(backend, torch.float32, x=x)
    wd = w.to(backend)
    y = FL.fixed_hidden(ours["x"], wd, 0.5)
    y_ref = torch.relu(ref["x"] @ w.double() + 0.5)
    _check_fwd_bwd(y, y_ref, ours, ref, grad_out, f"fixed_hidden {value} in {where}")


# ------------------------------------------------------------------------ halving loop
def _halve_ref(y: torch.Tensor, threshold: float = 1.0):
    """The seed's loop in y's dtype, as (y * 2**-k, k); its limit where it never ends."""
    y = y.detach().clone()
    s = y.abs().sum()
    if s.isnan():
        return y, 0
    if y.isinf().any():
        return torch.where(y.isinf(), y, torch.copysign(torch.zeros_like(y), y)), FOREVER
    k = 0
    while y.abs().sum() > threshold:
        y /= 2
        k += 1
    return y, k


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_halve_until(backend, value, dtype):
    x = (torch.randn(3, 11) * 8).to(dtype)
    x = _plant(x, value, 5, 20)
    y_ref, k_ref = _halve_ref(x)
    xd = x.to(backend).requires_grad_()
    y, k = FL.halve_until(xd, return_count=True)
    assert int(k) == k_ref, f"count {int(k)} != the loop's {k_ref}"
    _assert_same(y, y_ref, f"halve_until {value}", atol=0, rtol=0)
    assert torch.equal(y.detach().cpu().signbit(), y_ref.signbit()), "signs of zeros differ"
    grad_out = _plant(torch.randn(3, 11, dtype=dtype), "nan", 2)
    (g,) = torch.autograd.grad(y, xd, grad_out.to(backend))
    # The docstring's rule: grad * 2**-k, rounded once to the dtype.
    g_ref = (grad_out.double() * 2.0 ** -k_ref).to(dtype)
    _assert_same(g, g_ref, "halve_until grad", atol=0, rtol=0)


# ------------------------------------------------------------------------ FixedHiddenMLP
@pytest.mark.parametrize("where", ["x", "weight", "bias", "grad_out"])
@pytest.mark.parametrize("value", VALUES)
def test_fixed_hidden_mlp(backend, where, value):
    d = 5
    t = dict(x=torch.randn(3, d), weight=torch.randn(d, d) / 2, bias=torch.randn(d))
    rand_weight = torch.rand(d, d)
    grad_out = torch.randn(3, d)
    if where == "grad_out":
        grad_out = _plant(grad_out, value, 6)
    else:
        t[where] = _plant(t[where], value, 6)
    ours, ref = _leaves(backend, torch.float32, **t)
    out, k = FL.fixed_hidden_mlp(ours["x"], ours["weight"], ours["bias"], rand_weight.to(backend),
                                 c=1.0, return_count=True)

    def lin(v):
        return F.linear(v, ref["weight"], ref["bias"])
    y64 = lin(torch.relu(lin(ref["x"]) @ rand_weight.double() + 1.0))
    _, k_ref = _halve_ref(y64)
    assert int(k) == k_ref, f"count {int(k)} != the loop's {k_ref}"
    scale = 2.0 ** -k_ref
    if k_ref == FOREVER:  # the limit: finite elements -> signed zeros, inf kept
        y_ref = torch.where(y64.isinf(), y64.detach(), y64 * 0.0)
    else:
        y_ref = y64 * scale
    _check_fwd_bwd(out, y_ref, ours, ref, grad_out, f"fixed_hidden_mlp {value} in {where}")


# ------------------------------------------------------------------------ the ReLU mask itself
class _ThroughOps(torch.utils._python_dispatch.TorchDispatchMode):
    """A pass-through dispatch mode: the ops then run through their registered custom ops
    (as under torch.compile), so the torch path's backward is fastlayers.reference's."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_reference_relu_grad_is_threshold_backward():
    from fastlayers import reference
    out = torch.randn(40, dtype=torch.float64)
    for i, v in enumerate([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-310, -1e-310]):
        out[3 * i] = v
    grad = torch.randn(40, dtype=torch.float64)
    expect = torch.ops.aten.threshold_backward(grad, out, 0)
    assert torch.equal(reference.relu_grad(grad, out), expect)
    assert reference.relu_grad(grad, out)[0] == grad[0]  # NaN output: the gradient passes


@pytest.mark.parametrize("mode", ["custom_ops", "frozen_weight"])
def test_nan_output_gradient_on_every_backward(backend, mode):
    """NaN outputs pass dy in every backward implementation: the custom ops' backward (as
    traced code runs it) and the frozen-weight, trainable-bias path."""
    x, w, c_w = torch.randn(4, 5), torch.randn(3, 5), torch.randn(5, 5)
    b = torch.tensor([math.nan, 0.5, -0.25])
    grad_out = torch.rand(4, 3) + 0.5
    ours, ref = _leaves(backend, torch.float32, x=x, weight=w, bias=b)
    if mode == "frozen_weight":
        ours["weight"].requires_grad_(False)
        ref["weight"].requires_grad_(False)
    with _ThroughOps() if mode == "custom_ops" else contextlib.nullcontext():
        y = FL.linear_relu(ours["x"], ours["weight"], ours["bias"])
        g = _grads(y, ours, grad_out.to(y.device))
        xf = _plant(torch.randn(4, 5), "nan", 2).to(backend).requires_grad_()
        h = FL.fixed_hidden(xf, c_w.to(backend), 0.5)
        (gh,) = torch.autograd.grad(h, xf, torch.ones_like(h))
    g_ref = _grads(torch.relu(F.linear(ref["x"], ref["weight"], ref["bias"])), ref,
                   grad_out.double())
    for k in g_ref:
        _assert_same(g[k], g_ref[k], f"{mode} grad {k}")
    xr = xf.detach().cpu().double().requires_grad_()
    hr = torch.relu(xr @ c_w.double() + 0.5)
    (gh_ref,) = torch.autograd.grad(hr, xr, torch.ones_like(hr))
    _assert_same(gh, gh_ref, f"{mode} fixed_hidden grad x")


def _check_mlp_through_ops(backend, t, what):
    """fixed_hidden_mlp (c = 0.5) forward and gradients of the leaves ``t`` through its
    registered ops, against torch's float64 autograd of the seed's block halved k times."""
    d = t["weight"].shape[0]
    rand_weight = torch.rand(d, d) - 0.25
    grad_out = torch.randn(t["x"].shape)
    ours, ref = _leaves(backend, torch.float32, **t)
    with _ThroughOps():
        out, k = FL.fixed_hidden_mlp(ours["x"], ours["weight"], ours["bias"],
                                     rand_weight.to(backend), c=0.5, return_count=True)
        g = _grads(out, ours, grad_out.to(backend))

    def lin(v):
        return F.linear(v, ref["weight"], ref["bias"])
    y_ref = lin(torch.relu(lin(ref["x"]) @ rand_weight.double() + 0.5)) * 2.0 ** -int(k)
    _assert_same(out, y_ref, f"fixed_hidden_mlp forward{what}")
    g_ref = _grads(y_ref, ref, grad_out.double())
    for name in g_ref:
        _assert_same(g[name], g_ref[name], f"fixed_hidden_mlp grad {name}{what}")


@pytest.mark.parametrize("where", ["bias", "x"])
def test_fixed_hidden_mlp_backward_through_custom_ops(backend, where):
    """fixed_hidden_mlp's gradients through its registered ops (as traced code runs them:
    on the torch path fastlayers.reference.fixed_hidden_mlp_bwd), with a NaN in the first Linear's
    output, against torch's float64 autograd of the composite."""
    d = 5
    t = dict(x=torch.randn(3, d), weight=torch.randn(d, d) / 2, bias=torch.randn(d))
    t[where] = _plant(t[where], "nan", 2)
    _check_mlp_through_ops(backend, t, f", NaN in {where}")


def test_fixed_hidden_mlp_finite_backward_through_custom_ops(backend):
    """The same without special values: every term of the reference backward counts."""
    d = 6
    t = dict(x=torch.randn(4, d), weight=torch.randn(d, d) / 2, bias=torch.randn(d))
    _check_mlp_through_ops(backend, t, "")
