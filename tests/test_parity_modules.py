"""Parity suite, modules and blocks: every public module (and a fuse()d model) on both paths,
forward and every gradient, in every kernel dtype, against the same computation written
with torch's own ops in float64."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as torchF

import fastlayers
from _parity import seed_loop_count
from _util import REL_TOL, assert_close_to_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _chain64(m, x):
    """The module's computation with torch's ops on float64 copies of its tensors."""
    if isinstance(m, (fastlayers.LinearReLU,)):
        return torch.relu(torchF.linear(x, m.weight, m.bias))
    if isinstance(m, fastlayers.MyLinear):
        return torch.relu(x @ m.weight + m.bias)
    if isinstance(m, fastlayers.CenteredLayer):
        return x - (x.mean() if m.dim is None else x.mean(m.dim, keepdim=True))
    if isinstance(m, fastlayers.FixedHiddenMatmul):
        return torch.relu(x @ m.weight + m.c)
    if isinstance(m, fastlayers.NestMLP):
        return _chain64(m.linear, _chain64(m.net, x))
    if isinstance(m, (nn.Sequential, fastlayers.MySequential)):
        for child in m:
            x = _chain64(child, x)
        return x
    if isinstance(m, nn.Linear):
        return torchF.linear(x, m.weight, m.bias)
    if isinstance(m, (nn.ReLU,)):
        return torch.relu(x)
    if isinstance(m, nn.Identity):
        return x
    raise TypeError(type(m))


def _models(device, dtype):
    f = {"device": device, "dtype": dtype}
    plain = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(),
                          nn.Linear(5, 3)).to(**f)
    return {
        "LinearReLU": fastlayers.LinearReLU(7, 13, **f),
        "LinearReLU-nobias": fastlayers.LinearReLU(7, 13, bias=False, **f),
        "LazyLinearReLU": fastlayers.LazyLinearReLU(13, **f),
        "MyLinear": fastlayers.MyLinear(7, 5, **f),
        "CenteredLayer": fastlayers.CenteredLayer(),
        "CenteredLayer-dim": fastlayers.CenteredLayer(dim=-1),
        "FixedHiddenMatmul": fastlayers.FixedHiddenMatmul(7, 11, **f),
        "NestMLP": fastlayers.NestMLP(7, 13, 5, 3, **f),
        "MySequential": fastlayers.MySequential(fastlayers.LinearReLU(7, 5, **f),
                                                fastlayers.CenteredLayer(),
                                                fastlayers.MyLinear(5, 3, **f)),
        "fused": fastlayers.fuse(plain),
    }


NAMES = list(_models("cpu", torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_module_forward_and_gradients(backend, name, dtype):
    model = _models(backend, dtype)[name]
    x = (torch.randn(2, 3, 7, dtype=torch.float64) * 0.7).to(backend, dtype).requires_grad_()
    y = model(x)  # (materialises the lazy layer)
    model64 = copy.deepcopy(model).double()
    x64 = x.detach().double().requires_grad_()
    ref = _chain64(model64, x64)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = REL_TOL[dtype] * 4  # a few layers, each rounding to dtype
    assert_close_to_ref(y, ref, dtype, tol=tol, what=f"{name} forward")
    g = torch.randn(y.shape, dtype=torch.float64).to(backend, dtype)
    params = [p for p in model.parameters()]
    params64 = [p for p in model64.parameters()]
    got = torch.autograd.grad(y, [x] + params, g)
    want = torch.autograd.grad(ref, [x64] + params64, g.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_to_ref(a, b, dtype, tol=tol * 2, what=f"{name} grad {i}")


@pytest.mark.parametrize("reduce", [None, "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fixed_hidden_mlp_block(backend, dtype, reduce):
    """The block against the seed's loop run in the block's dtype (the count) and the
    float64 body (the values), with gradients for x, weight and bias."""
    torch.manual_seed(3)
    m = fastlayers.FixedHiddenMLP(13, reduce=reduce, device=backend, dtype=dtype)
    x = torch.randn(5, 13, dtype=torch.float64).to(backend, dtype).requires_grad_()
    out, k = m.forward_with_count(x)
    w, b, r = (t.detach().double() for t in (m.linear.weight, m.linear.bias, m.rand_weight))
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.clone().requires_grad_(), b.clone().requires_grad_()
    y64 = torchF.linear(torch.relu(torchF.linear(x64, w64, b64) @ r + 1), w64, b64)
    with torch.no_grad():  # the loop's count, on the body computed in the block's dtype
        y_lo = torchF.linear(torch.relu(torchF.linear(x.detach(), m.linear.weight, m.linear.bias)
                                        @ m.rand_weight + 1), m.linear.weight, m.linear.bias)
    assert int(k) == seed_loop_count(y_lo)
    ref = y64 * 2.0 ** -int(k)
    ref = ref.sum() if reduce == "sum" else ref
    assert_close_to_ref(out, ref, dtype, tol=REL_TOL[dtype] * 8, what="FixedHiddenMLP")
    g = torch.randn(out.shape, dtype=torch.float64).to(backend, dtype)
    got = torch.autograd.grad(out, [x, m.linear.weight, m.linear.bias], g)
    want = torch.autograd.grad(ref, [x64, w64, b64], g.double())
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        assert_close_to_ref(a, b, dtype, tol=REL_TOL[dtype] * 16, what=f"FixedHiddenMLP d{name}")
