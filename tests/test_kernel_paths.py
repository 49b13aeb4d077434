"""Paths the other tests did not reach: gradients of the composed FixedHiddenMLP (d > 64),
a backward that really launches the gradient kernels, centering into an output whose
strides differ from the input's, and double backward of the block with c != 1."""
import pytest
import torch
import torch.nn.functional as TF

import fastlayers
from _util import REL_TOL, assert_close_to_ref, counted_launches, randn
from conftest import KERNEL_DEVICE, requires_triton
from fastlayers import functional as F


@requires_triton
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_composed_fixed_hidden_mlp_gradients_match_float64(reduce):
    d, B = 70, 9  # d > FUSED_MAX_D: the composed GEMMs
    with fastlayers.use_backend("triton"):
        mlp = fastlayers.FixedHiddenMLP(d, reduce=reduce).to(KERNEL_DEVICE)
        x = randn(B, d, device=KERNEL_DEVICE).requires_grad_(True)
        out, k = mlp.forward_with_count(x)
        g = torch.randn(out.shape, dtype=torch.float64).float().to(KERNEL_DEVICE)
        out.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    w64 = mlp.linear.weight.detach().double().requires_grad_(True)
    b64 = mlp.linear.bias.detach().double().requires_grad_(True)
    y64 = TF.linear(torch.relu(TF.linear(x64, w64, b64) @ mlp.rand_weight.double() + 1),
                    w64, b64) * 2.0 ** -int(k)
    (y64.sum() if reduce == "sum" else y64).backward(g.double())
    for got, want, what in [(x.grad, x64.grad, "x"), (mlp.linear.weight.grad, w64.grad, "W"),
                            (mlp.linear.bias.grad, b64.grad, "b")]:
        assert_close_to_ref(got, want, torch.float32, tol=4 * REL_TOL[torch.float32], what=what)


@requires_triton
def test_backward_runs_the_gradient_kernels():
    """A plain backward launches the fused GEMMs (not torch's composite)."""
    with fastlayers.use_backend("triton"):
        x = randn(9, 17, device=KERNEL_DEVICE).requires_grad_(True)
        w = randn(5, 17, device=KERNEL_DEVICE).requires_grad_(True)
        b = randn(5, device=KERNEL_DEVICE).requires_grad_(True)
        y = F.linear_relu(x, w, b)
        with counted_launches() as launches:
            y.backward(randn(9, 5, device=KERNEL_DEVICE))
        assert launches.count("_fused_gemm_kernel") == 2, launches
        mlp = fastlayers.FixedHiddenMLP(20).to(KERNEL_DEVICE)
        out, _ = mlp.forward_with_count(randn(6, 20, device=KERNEL_DEVICE))
        with counted_launches() as launches:
            out.backward(torch.ones_like(out))
        assert launches.count("_fused_gemm_kernel") == 3, launches


@requires_triton
@pytest.mark.parametrize("path", ["split", "segments"])
def test_centering_paths_with_output_strides_unlike_the_input(path):
    from fastlayers.kernels import centered as K
    x = randn(3, 2 * 129, device=KERNEL_DEVICE)[:, ::2]  # not dense: out is contiguous
    y = K.centered(x, [1], path)
    x64 = x.double()
    assert_close_to_ref(y, x64 - x64.mean(1, keepdim=True), torch.float32)


@pytest.mark.parametrize("c", [-0.75, 2.5])
def test_fixed_hidden_mlp_double_backward_with_c(backend, c):
    """create_graph=True recomputes h2 with the call's c (not the default 1.0)."""
    from fastlayers import functional as FL
    d = 6
    x = randn(4, d, device=backend).requires_grad_(True)
    w = (randn(d, d, device=backend) * d ** -0.5).requires_grad_(True)
    b = randn(d, device=backend).requires_grad_(True)
    r = torch.rand(d, d, device=backend)
    y, k = FL.fixed_hidden_mlp(x, w, b, r, c=c, return_count=True)
    g = randn(4, d, device=backend)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gw,) = torch.autograd.grad((gx ** 2).sum(), w)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    h64 = torch.relu(TF.linear(x64, w64, b64) @ r.double() + c)
    y64 = TF.linear(h64, w64, b64) * 2.0 ** -int(k)
    (gx64,) = torch.autograd.grad(y64, x64, g.double(), create_graph=True)
    (gw64,) = torch.autograd.grad((gx64 ** 2).sum(), w64)
    assert_close_to_ref(gx, gx64, torch.float32, tol=1e-5, what="dx")
    assert_close_to_ref(gw, gw64, torch.float32, tol=1e-5, what="d2/dW")
