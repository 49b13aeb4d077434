"""Parity suite, autograd: double backward, torch.func transforms, forward-mode AD,
gradcheck-style checks of the kernel formulas, and meta tensors, on both paths, against
torch's own float64 composites.

float64 always runs torch, so the kernel formulas are checked in fp32 against the float64
composite's analytic derivatives (and its own double backward)."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _parity import centered64, d, fixed_hidden64, fixed_hidden_mlp64, linear_relu64, make
from _util import assert_close_to_ref
from torch import func

import fastlayers
from fastlayers import functional as FL

TOL = 1e-5  # fp32 kernels vs float64, second order included


_RM = {}


def _rm(device):
    """The frozen rand_weight of the FixedHiddenMLP cases (one per device)."""
    if device not in _RM:
        _RM[device] = make((7, 7), device=device).abs()
    return _RM[device]


def _ops(device):
    """(name, fastlayers fn, float64 composite or None, args) for every differentiable op;
    fixed_hidden_mlp's composite needs the halving count, found by the first call."""
    x = make((5, 7), device=device)
    w = make((3, 7), device=device, layout="transposed")
    b = make((3,), device=device)
    r = make((7, 4), device=device).abs()
    wm, bm = make((7, 7), device=device) * 0.3, make((7,), device=device)
    return [
        ("linear_relu", FL.linear_relu, linear_relu64, (x, w, b)),
        ("fixed_hidden", lambda x: FL.fixed_hidden(x, r, 0.5),
         lambda x: fixed_hidden64(x, r.double(), 0.5), (x,)),
        ("centered", lambda x: FL.centered(x, -1), lambda x: centered64(x, -1), (x,)),
        ("fixed_hidden_mlp", lambda x, w, b: FL.fixed_hidden_mlp(x, w, b, _rm(device)),
         None, (x, wm, bm)),
    ]


@pytest.mark.parametrize("idx", range(4), ids=["linear_relu", "fixed_hidden", "centered",
                                                "fixed_hidden_mlp"])
def test_double_backward_keeps_second_order_terms(backend, idx):
    """Issue 9, case 2: a gradient penalty trains on the true second derivative."""
    name, ours, ref, args = _ops(backend)[idx]
    args = [a.clone().requires_grad_() for a in args]
    args64 = [d(a) for a in args]
    if ref is None:  # fixed_hidden_mlp: the float64 body halved k times
        k = int(FL.fixed_hidden_mlp(*args, _rm(backend), return_count=True)[1])
        ref = (lambda x, w, b: fixed_hidden_mlp64(x, w, b, _rm(backend).double(), 1.0, k))
    y, y64 = ours(*args), ref(*args64)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, args[0], g, create_graph=True)
    (gx64,) = torch.autograd.grad(y64, args64[0], g.double(), create_graph=True)
    assert_close_to_ref(gx, gx64, torch.float32, tol=TOL, what=f"{name} dx")
    assert gx.requires_grad == gx64.requires_grad, f"{name}: the gradient's graph differs"
    if not gx64.requires_grad:
        return  # the gradient does not depend on the inputs (centering is linear)
    penalty, penalty64 = (gx ** 2).sum(), (gx64 ** 2).sum()
    wrt = [a for a in args if a.requires_grad]
    got = torch.autograd.grad(penalty, wrt, allow_unused=True)
    want = torch.autograd.grad(penalty64, [a for a in args64 if a.requires_grad],
                               allow_unused=True)
    for i, (gg, ww, a) in enumerate(zip(got, want, wrt)):
        # None means "no dependence": zeros (ReLU's second derivative is 0 almost everywhere)
        gg = torch.zeros_like(a) if gg is None else gg
        ww = torch.zeros_like(a, dtype=torch.float64) if ww is None else ww
        assert ww.abs().sum() == 0 or gg.abs().sum() > 0, f"{name}: arg {i} lost its term"
        assert_close_to_ref(gg, ww, torch.float32, tol=TOL, what=f"{name} d2/darg{i}")


def test_grad_vmap_jacrev_jvp_on_linear_relu_layer(backend):
    """Issue 9, case 3: torch.func on LinearReLU, per-sample gradients included."""
    layer = fastlayers.LinearReLU(6, 4).to(backend)
    ref_layer = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).double()
    ref_layer[0].load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    params = dict(layer.named_parameters())
    params64 = {k: v.detach().double() for k, v in params.items()}
    x = make((5, 6), device=backend)

    def loss(p, xi):
        return func.functional_call(layer, p, (xi,)).pow(2).sum()

    def loss64(p, xi):
        out = torch.relu(torch.nn.functional.linear(xi, p["weight"], p["bias"]))
        return out.pow(2).sum()

    per_sample = func.vmap(func.grad(loss), in_dims=(None, 0))(params, x)
    per_sample64 = func.vmap(func.grad(loss64), in_dims=(None, 0))(params64, x.double())
    for k in params:
        assert per_sample[k].shape == (5,) + params[k].shape
        assert_close_to_ref(per_sample[k], per_sample64[k], torch.float32, tol=TOL, what=k)
    jac = func.jacrev(layer)(x)
    jac64 = func.jacrev(ref_layer)(x.double())
    assert_close_to_ref(jac, jac64, torch.float32, tol=TOL, what="jacrev")
    t = make((5, 6), device=backend)
    y, jy = func.jvp(layer, (x,), (t,))
    y64, jy64 = func.jvp(ref_layer, (x.double(),), (t.double(),))
    assert_close_to_ref(y, y64, torch.float32, tol=TOL, what="jvp primal")
    assert_close_to_ref(jy, jy64, torch.float32, tol=TOL, what="jvp tangent")


@pytest.mark.parametrize("module", ["CenteredLayer", "FixedHiddenMatmul", "MyLinear",
                                    "FixedHiddenMLP"])
def test_torch_func_on_every_module(backend, module):
    """grad, vmap and forward-mode AD through each module (both paths)."""
    torch.manual_seed(1)
    m = {"CenteredLayer": lambda: fastlayers.CenteredLayer(),
         "FixedHiddenMatmul": lambda: fastlayers.FixedHiddenMatmul(6, 6),
         "MyLinear": lambda: fastlayers.MyLinear(6, 6),
         "FixedHiddenMLP": lambda: fastlayers.FixedHiddenMLP(6)}[module]().to(backend)
    x = make((4, 6), device=backend) * 0.5
    m64 = copy.deepcopy(m).double()  # float64 runs torch's own ops on every backend
    with fastlayers.use_backend("torch"):
        gx64 = func.grad(lambda v: m64(v).sin().sum())(x.double())
        vm64 = func.vmap(m64)(x.double().unsqueeze(1))
    gx = func.grad(lambda v: m(v).sin().sum())(x)
    assert_close_to_ref(gx, gx64, torch.float32, tol=TOL, what=f"{module} grad")
    vm = func.vmap(m)(x.unsqueeze(1))
    assert_close_to_ref(vm, vm64, torch.float32, tol=TOL, what=f"{module} vmap")
    t = make((4, 6), device=backend)
    with fwAD.dual_level():
        out = m(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(out)
    with fwAD.dual_level(), fastlayers.use_backend("torch"):
        out64 = m64(fwAD.make_dual(x.double(), t.double()))
        primal64, tangent64 = fwAD.unpack_dual(out64)
    assert_close_to_ref(primal, primal64, torch.float32, tol=TOL, what=f"{module} fwAD primal")
    assert_close_to_ref(tangent, tangent64, torch.float32, tol=TOL, what=f"{module} fwAD")


@pytest.mark.parametrize("backend_name", ["auto", "torch", "triton"])
def test_meta_tensors_give_shapes_only(backend_name):
    """Issue 9, case 6: meta tensors never reach a kernel, on every backend setting."""
    with fastlayers.use_backend(backend_name):
        x = torch.empty(4, 6, device="meta")
        assert FL.linear_relu(x, torch.empty(3, 6, device="meta"),
                              torch.empty(3, device="meta")).shape == (4, 3)
        assert FL.centered(x).shape == (4, 6)
        assert FL.fixed_hidden(x, torch.empty(6, 2, device="meta")).shape == (4, 2)
        assert FL.fixed_hidden_mlp(x, torch.empty(6, 6, device="meta"), None,
                                   torch.empty(6, 6, device="meta")).shape == (4, 6)
        for m in (fastlayers.LinearReLU(6, 3, device="meta"), fastlayers.CenteredLayer(),
                  fastlayers.MyLinear(6, 3, device="meta"),
                  fastlayers.FixedHiddenMLP(6, device="meta")):
            y = m(x)
            assert y.device.type == "meta" and y.shape[0] == 4
