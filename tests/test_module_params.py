"""LinearReLU reads its parameters the way ``self.weight`` / ``self.bias`` would, under every
torch utility that moves or recomputes them: torch.nn.utils.parametrize, weight_norm (the
parametrization and the older hook), pruning, ``torch.func.functional_call``, and a user
subclass that defines ``weight`` as a property. Each is checked on both paths against an
independent float64 formula of the effective weight, forward and gradients of the tensors
that really hold the parameters."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize, prune

import fastlayers

from _util import assert_close_to_ref, randn

M, K, N = 5, 7, 3  # small and prime: the interpreter runs each GEMM in milliseconds


def _ref(x, w, b):
    """relu(x @ w.T + b) in float64 through torch autograd (independent of fastlayers)."""
    return torch.relu(x.double() @ w.double().t() + b.double())


class Scale(nn.Module):
    """A parametrization: the registered tensor times 2 (or minus 0.5 for a bias)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, t):
        return t * self.k


class MaskedLinearReLU(fastlayers.LinearReLU):
    """A subclass whose ``weight`` is a property over the registered parameter (masked
    once the mask exists; nn.Linear's init runs on the parameter itself)."""

    _masked = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", (torch.arange(self.in_features) % 2).float())
        self._masked = True

    @property
    def weight(self):
        w = self._parameters.get("weight")
        if w is None:  # (nn.Module.register_parameter asks hasattr first)
            raise AttributeError("weight")
        return w * self.mask if self._masked else w


def _wn(v, g):
    """weight_norm with dim=0: each row of v (each element of a 1-D v) scaled to norm g."""
    if v.dim() == 1:
        return g * v / v.abs()
    return g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True)


def _build(case, device):
    """(module, leaves, effective): the module after the transform, the float64 copies
    (requires_grad) of the tensors that hold its parameters, and a function of those
    copies giving the effective (weight, bias)."""
    m = fastlayers.LinearReLU(K, N, device=device)
    with torch.no_grad():  # random, not zero, biases: the ReLU mask matters
        m.bias.copy_(randn(N, device=device))
    if case == "parametrize":
        parametrize.register_parametrization(m, "weight", Scale(2.0))
        parametrize.register_parametrization(m, "bias", Scale(-0.5))
        held = {"w": m.parametrizations.weight.original, "b": m.parametrizations.bias.original}
        return m, held, lambda t: (2.0 * t["w"], -0.5 * t["b"])
    if case == "weight_norm":
        parametrizations.weight_norm(m)
        held = {"g": m.parametrizations.weight.original0,
                "v": m.parametrizations.weight.original1, "b": m.bias}
        return m, held, lambda t: (_wn(t["v"], t["g"]), t["b"])
    if case == "weight_norm_hook_on_bias":  # the deprecated hook form, on the bias
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(m, name="bias", dim=0)
        with torch.no_grad():
            m.bias_g.mul_(1.5)  # so the recomputed bias differs from the original one
        held = {"w": m.weight, "g": m.bias_g, "v": m.bias_v}
        return m, held, lambda t: (t["w"], _wn(t["v"], t["g"]))
    if case == "prune":
        prune.l1_unstructured(m, "weight", amount=0.4)
        mask = m.weight_mask.clone()
        held = {"w": m.weight_orig, "b": m.bias}
        return m, held, lambda t: (t["w"] * mask.double(), t["b"])
    if case == "subclass_property":
        m = MaskedLinearReLU(K, N, device=device)
        with torch.no_grad():
            m.bias.copy_(randn(N, device=device))
        mask = m.mask.clone()
        held = {"w": m._parameters["weight"], "b": m.bias}
        return m, held, lambda t: (t["w"] * mask.double(), t["b"])
    raise AssertionError(case)


CASES = ["parametrize", "weight_norm", "weight_norm_hook_on_bias", "prune", "subclass_property"]


@pytest.mark.parametrize("case", CASES)
def test_transformed_parameters_are_used(backend, case):
    m, held, effective = _build(case, backend)
    x = randn(M, K, device=backend).requires_grad_(True)
    y = m(x)
    copies = {k: t.detach().double().requires_grad_(True) for k, t in held.items()}
    x64 = x.detach().double().requires_grad_(True)
    want = _ref(x64, *effective(copies))
    assert_close_to_ref(y, want, what=f"{case} forward")
    gy = randn(M, N, device=backend)
    y.backward(gy)
    want.backward(gy.double())
    assert_close_to_ref(x.grad, x64.grad, what=f"{case} grad_input")
    for name, t in held.items():
        assert t.grad is not None, f"{case}: no gradient reached {name}"
        assert_close_to_ref(t.grad, copies[name].grad, what=f"{case} grad {name}")


def test_functional_call_swaps_parameters(backend):
    """torch.func.functional_call: the module runs with the tensors passed in, not its own."""
    m = fastlayers.LinearReLU(K, N, device=backend)
    w = randn(N, K, device=backend).requires_grad_(True)
    b = randn(N, device=backend).requires_grad_(True)
    x = randn(M, K, device=backend)
    y = torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
    assert_close_to_ref(y, _ref(x, w, b), what="functional_call")
    y.sum().backward()
    assert w.grad is not None and b.grad is not None and m.weight.grad is None
    assert_close_to_ref(m(x), _ref(x, m.weight, m.bias), what="own parameters after")


def test_replaced_and_deleted_parameters(backend):
    """A new Parameter assigned to the attribute is used; bias=False stays without bias."""
    m = fastlayers.LinearReLU(K, N, device=backend)
    m.weight = nn.Parameter(randn(N, K, device=backend))
    x = randn(M, K, device=backend)
    assert_close_to_ref(m(x), _ref(x, m.weight, m.bias), what="new weight")
    m2 = fastlayers.LinearReLU(K, N, bias=False, device=backend)
    assert_close_to_ref(m2(x), _ref(x, m2.weight, torch.zeros(N)), what="no bias")
