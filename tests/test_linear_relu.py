"""Linear + bias + ReLU: kernels (interpreter on CPU, GPU with CUDA) and the torch fallback
against a float64 reference; autograd, opcheck, compile, modules, errors.
Tests without the ``backend`` fixture say why in their docstring or by their nature: float64
gradchecks (float64 always runs torch; the kernel formulas are checked in fp32 against
float64 in test_parity_autograd.py), init/state_dict/repr (no op runs), CUDA-only checks."""
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as TF

import fastlayers
from fastlayers import functional as F
from fastlayers import reference
from fastlayers.ops import linear_relu as ops

from _util import TF32_REL_TOL, assert_close_to_ref, randn, rel_err
from conftest import HAS_CUDA, KERNEL_DEVICE, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): ones, primes, K and N across the interpreter's 32-wide tiles, N=1, empty batch.
SHAPES = [(1, 1, 1), (7, 13, 1), (37, 45, 33), (33, 64, 31), (2, 97, 5), (0, 5, 3), (31, 32, 64)]


def ref64(x, w, b):
    return reference.linear_relu(x.double(), w.double(), None if b is None else b.double())


def ref64_grads(x, w, b, gy):
    """Float64 gradients through torch autograd of the plain formula (independent of ours)."""
    xs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = torch.relu(TF.linear(*xs))
    y.backward(gy.double())
    return [t.grad if t is not None else None for t in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_backward_match_float64(backend, shape, dtype, has_bias):
    M, K, N = shape
    x = randn(M, K, dtype=dtype, device=backend).requires_grad_(True)
    w = randn(N, K, dtype=dtype, device=backend, scale=K ** -0.5).requires_grad_(True)
    b = randn(N, dtype=dtype, device=backend).requires_grad_(True) if has_bias else None
    y = F.linear_relu(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype and y.device == x.device
    assert_close_to_ref(y, ref64(x, w, b), dtype, what="forward")

    gy = randn(M, N, dtype=dtype, device=backend)
    y.backward(gy)
    gx, gw, gb = ref64_grads(x, w, b, gy)
    # The masked grad_out is exact; a wrong mask or transpose gives O(1) errors.
    assert_close_to_ref(x.grad, gx, dtype, what="grad_input")
    assert_close_to_ref(w.grad, gw, dtype, what="grad_weight")
    if has_bias:
        assert_close_to_ref(b.grad, gb, dtype, what="grad_bias")


@pytest.mark.parametrize("M, N", [(63, 65), (64, 64), (67, 97)])
def test_large_outputs_with_grad_all_orders(backend, M, N):
    """Outputs of 4095, 4096 and 6499 elements with grad: on the torch path the ReLU runs
    in place from 4096 elements up (reference._relu). Values, first and second
    derivatives, torch.func.grad and jvp all match float64 autograd of relu(linear)."""
    K = 31
    x = randn(M, K, device=backend).requires_grad_(True)
    w = randn(N, K, device=backend, scale=K ** -0.5).requires_grad_(True)
    b = randn(N, device=backend).requires_grad_(True)
    y = F.linear_relu(x, w, b)
    assert_close_to_ref(y, ref64(x, w, b), torch.float32, what="forward")
    gy = randn(M, N, device=backend)
    gx, = torch.autograd.grad(y, x, gy, create_graph=True)
    ggx, = torch.autograd.grad((gx * gx).sum(), w)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    yd = torch.relu(TF.linear(xd, wd, bd))
    gxd, = torch.autograd.grad(yd, xd, gy.double(), create_graph=True)
    ggxd, = torch.autograd.grad((gxd * gxd).sum(), wd)
    assert_close_to_ref(gx, gxd, torch.float32, what="grad_input")
    assert_close_to_ref(ggx, ggxd, torch.float32, what="second derivative")
    loss = lambda v: F.linear_relu(v, w, b).mul(gy).sum()
    loss64 = lambda v: torch.relu(TF.linear(v, wd, bd)).mul(gy.double()).sum()
    assert_close_to_ref(torch.func.grad(loss)(x.detach()), torch.func.grad(loss64)(xd.detach()),
                        torch.float32, what="torch.func.grad")
    t = randn(M, K, device=backend)
    _, tangent = torch.func.jvp(lambda v: F.linear_relu(v, w, b), (x.detach(),), (t,))
    _, tangent64 = torch.func.jvp(lambda v: torch.relu(TF.linear(v, wd, bd)), (xd.detach(),),
                                  (t.double(),))
    assert_close_to_ref(tangent, tangent64, torch.float32, what="jvp")


@pytest.mark.parametrize("layout", ["x_transposed", "x_sliced", "w_transposed", "three_d", "one_d"])
def test_strided_and_ranked_inputs(backend, layout):
    K, N = 45, 33
    w = randn(N, K, device=backend, scale=0.2)
    b = randn(N, device=backend)
    if layout == "x_transposed":
        x = randn(K, 37, device=backend).t()
    elif layout == "x_sliced":
        x = randn(37, 2 * K, device=backend)[:, ::2]
    elif layout == "w_transposed":
        x = randn(37, K, device=backend)
        w = randn(K, N, device=backend, scale=0.2).t()
    elif layout == "three_d":
        x = randn(3, 11, K, device=backend)
    else:
        x = randn(K, device=backend)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = F.linear_relu(x, w, b)
    assert y.shape == (*x.shape[:-1], N)
    assert_close_to_ref(y, ref64(x, w, b), what=layout)
    gy = randn(*y.shape, device=backend)
    y.backward(gy)
    gx, gw, _ = ref64_grads(x, w, b, gy)
    assert_close_to_ref(x.grad, gx, what="grad_input")
    assert_close_to_ref(w.grad, gw, what="grad_weight")


def test_grad_from_sum_has_stride_zero(backend):
    """.sum() hands backward an expanded (stride 0) gradient; it must still be right."""
    x = randn(37, 45, device=backend).requires_grad_(True)
    w = randn(33, 45, device=backend, scale=0.2).requires_grad_(True)
    b = randn(33, device=backend).requires_grad_(True)
    F.linear_relu(x, w, b).sum().backward()
    gx, gw, gb = ref64_grads(x, w, b, torch.ones(37, 33, dtype=torch.float64))
    assert_close_to_ref(x.grad, gx)
    assert_close_to_ref(w.grad, gw)
    assert_close_to_ref(b.grad, gb)


@pytest.mark.parametrize("need", ["x", "w", "b", "wb"])
def test_only_requested_grads(backend, need):
    x = randn(9, 17, device=backend).requires_grad_("x" in need)
    w = randn(5, 17, device=backend).requires_grad_("w" in need)
    b = randn(5, device=backend).requires_grad_("b" in need)
    y = F.linear_relu(x, w, b)
    gy = randn(9, 5, device=backend)
    y.backward(gy)
    ref = ref64_grads(x, w, b, gy)
    for name, t, r in zip("xwb", (x, w, b), ref):
        if name in need:
            assert_close_to_ref(t.grad, r, what=f"grad {name}")
        else:
            assert t.grad is None


@requires_triton
@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_fp32_precision_modes(mode):
    """Each fp32 mode runs and keeps its accuracy promise; the switch is torch's own."""
    from fastlayers._backend import fp32_matmul_mode
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = mode
        assert fp32_matmul_mode() == mode
        M, K, N = (257, 512, 129) if HAS_CUDA else (40, 70, 33)
        x = randn(M, K, device=KERNEL_DEVICE)
        w = randn(N, K, device=KERNEL_DEVICE, scale=K ** -0.5)
        with fastlayers.use_backend("triton"):
            y = F.linear_relu(x, w)
        ref = ref64(x, w, None)
        if mode == "tf32":
            assert rel_err(y, ref) < TF32_REL_TOL
        else:
            # fp32-accurate: no worse than 2x torch's own fp32 matmul on the same device
            # (this mode makes torch's CUDA matmul plain fp32 too).
            torch_err = rel_err(torch.relu(x @ w.t()), ref)
            assert rel_err(y, ref) <= max(2 * torch_err, 1e-7)
    finally:
        matmul.fp32_precision = old


def test_legacy_precision_api_is_honoured():
    from fastlayers._backend import fp32_matmul_mode
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert fp32_matmul_mode() == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert fp32_matmul_mode() == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


def test_gradcheck_float64():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.linear_relu, (x, w, b))
    # The op-level backward (used under torch.compile) too.
    assert torch.autograd.gradcheck(lambda *a: ops.fwd_op(*a, "ieee"), (x, w, b))


@pytest.mark.parametrize("has_bias", [True, False])
def test_opcheck(backend, has_bias):
    x = randn(9, 37, device=backend).requires_grad_(True)
    w = randn(33, 37, device=backend).requires_grad_(True)
    b = randn(33, device=backend).requires_grad_(True) if has_bias else None
    torch.library.opcheck(ops.fwd_op, (x, w, b, "ieee"))
    with torch.no_grad():
        y = ops.fwd_op(x, w, b, "ieee")
    gy = randn(9, 33, device=backend)
    torch.library.opcheck(ops.bwd_input_op, (gy, y, w.detach(), "ieee"))
    torch.library.opcheck(ops.bwd_params_op, (gy, y, x.detach(), "ieee"))
    torch.library.opcheck(ops.bwd_params_op, (gy.t().contiguous().t(), y, x.detach(), "tf32"))


def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = fastlayers.LinearReLU(20, 33).to(backend)
    x = randn(4, 3, 20, device=backend).requires_grad_(True)
    eager_y = layer(x)
    eager_y.square().sum().backward()
    eager_grads = [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
    x.grad = None
    layer.zero_grad()
    y = torch.compile(layer, fullgraph=True)(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    for g, e in zip([x.grad, layer.weight.grad, layer.bias.grad], eager_grads):
        torch.testing.assert_close(g, e)


def test_autocast_casts_like_linear(backend):
    layer = fastlayers.LinearReLU(24, 16).to(backend)
    x = randn(5, 24, device=backend)
    dev = torch.device(backend).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = layer(x)
        expected = torch.relu(nn.functional.linear(x, layer.weight, layer.bias))
    assert y.dtype == expected.dtype == torch.bfloat16
    assert_close_to_ref(y, ref64(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()))


def test_state_dict_moves_both_ways_with_nn_linear():
    lin = nn.Linear(11, 7)
    fused = fastlayers.LinearReLU(11, 7)
    assert list(fused.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    fused.load_state_dict(lin.state_dict(), strict=True)
    x = torch.randn(3, 11)
    torch.testing.assert_close(fused(x), torch.relu(lin(x)), rtol=0, atol=0)
    lin2 = nn.Linear(11, 7)
    lin2.load_state_dict(fastlayers.LinearReLU(11, 7).state_dict(), strict=True)
    no_bias = fastlayers.LinearReLU(11, 7, bias=False)
    assert list(no_bias.state_dict()) == ["weight"] and no_bias.bias is None


def test_linear_relu_init_and_repr_are_nn_linear():
    torch.manual_seed(3)
    lin = nn.Linear(19, 5)
    torch.manual_seed(3)
    fused = fastlayers.LinearReLU(19, 5)
    assert torch.equal(lin.weight, fused.weight) and torch.equal(lin.bias, fused.bias)
    assert repr(fused) == "LinearReLU(in_features=19, out_features=5, bias=True)"
    assert not isinstance(fused, nn.Linear)  # wrappers of nn.Linear must not drop the ReLU


def test_lazy_linear_relu_prints_and_infers():
    lazy = fastlayers.LazyLinearReLU(256)
    assert "in_features=0" in repr(lazy)
    y = lazy(torch.randn(2, 20))
    assert type(lazy) is fastlayers.LinearReLU
    assert repr(lazy) == "LinearReLU(in_features=20, out_features=256, bias=True)"
    assert lazy.weight.shape == (256, 20) and y.shape == (2, 256)
    assert torch.all(y >= 0)


def test_lazy_linear_relu_loaded_before_its_first_call():
    """As nn.LazyLinear: a state_dict loaded before the first call gives the weight, and the
    first call then sets in_features from it (or refuses an input of another width)."""
    plain = fastlayers.LinearReLU(5, 3)
    for lazy, torch_lazy in ((fastlayers.LazyLinearReLU(3), nn.LazyLinear(3)),
                             (fastlayers.LazyLinearReLU(3), None)):
        lazy.load_state_dict(plain.state_dict())
        if torch_lazy is None:
            with pytest.raises(ValueError, match="input has 4 features.*expects 5"):
                lazy(torch.randn(2, 4))
            continue
        torch_lazy.load_state_dict(plain.state_dict())
        x = torch.randn(2, 5)
        assert torch.equal(lazy(x), plain(x))
        torch_lazy(x)
        assert type(lazy) is fastlayers.LinearReLU
        assert lazy.in_features == torch_lazy.in_features == 5
        assert repr(lazy) == "LinearReLU(in_features=5, out_features=3, bias=True)"
        assert fastlayers.unfuse(nn.Sequential(lazy))[0].in_features == 5


def test_mylinear_matches_seed_and_gets_gradients(backend):
    layer = fastlayers.MyLinear(5, 3).to(backend)
    assert layer.weight.shape == (5, 3) and layer.bias.shape == (3,)
    X = randn(2, 5, device=backend)
    y = layer(X)
    seed = torch.relu(torch.matmul(X.double(), layer.weight.double()) + layer.bias.double())
    assert_close_to_ref(y, seed)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case, exc, words", [
    ("int_input", TypeError, ["input", "floating-point", "torch.int64"]),
    ("wrong_in_features", ValueError, ["in_features=8", "(3, 5)"]),
    ("bias_shape", ValueError, ["bias", "(4,)", "(5,)"]),
    ("device_mismatch", RuntimeError, ["weight", "meta", "cpu"]),
    ("dtype_mismatch", TypeError, ["torch.float16", "torch.float32"]),
    ("weight_rank", ValueError, ["2-D"]),
])
def test_bad_input_gets_clear_error(backend, case, exc, words):
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    if case == "int_input":
        x = torch.randint(0, 5, (3, 8))
    elif case == "wrong_in_features":
        x = torch.randn(3, 5)
    elif case == "bias_shape":
        b = torch.randn(5)
    elif case == "device_mismatch":
        w = torch.randn(4, 8, device="meta")
    elif case == "dtype_mismatch":
        w = w.half()
    else:
        w = torch.randn(4, 8, 1)
    with pytest.raises(exc) as info:
        F.linear_relu(x, w, b)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_float64_falls_back_to_torch_even_on_triton_backend():
    with fastlayers.use_backend("triton"):
        x = torch.randn(3, 4, dtype=torch.float64)
        w = torch.randn(2, 4, dtype=torch.float64)
        torch.testing.assert_close(F.linear_relu(x, w), torch.relu(x @ w.t()))


@pytest.mark.cuda
def test_more_than_2_31_elements_uses_64_bit_offsets():
    """x has 2**31 + 64 * 7 elements (4 GiB in bf16): rows past the int32 range must be right."""
    K, N = 64, 8
    M = 2 ** 31 // K + 7
    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    x.normal_()
    w = randn(N, K, dtype=torch.bfloat16, device="cuda", scale=0.125)
    b = randn(N, dtype=torch.bfloat16, device="cuda")
    with fastlayers.use_backend("triton"):
        y = F.linear_relu(x, w, b)
    for rows in (slice(0, 5), slice(M - 9, M), slice(2 ** 31 // K - 3, 2 ** 31 // K + 3)):
        assert_close_to_ref(y[rows], ref64(x[rows], w, b), what=f"rows {rows}")
    del x, y
    torch.cuda.empty_cache()


def test_zero_in_features_bias_gradient(backend):
    """in_features = 0: y = relu(bias) on every row, and the bias gradient sums grad_out
    where that output is > 0 (an empty GEMM; on the kernel path its row sums are filled
    without a launch). Bias entries exactly 0 give 0 outputs, which pass no gradient."""
    bias = torch.tensor([-1.5, 0.0, 0.5, 2.0, -0.0], device=backend, requires_grad=True)
    weight = torch.empty(5, 0, device=backend, requires_grad=True)
    x = torch.empty(6, 0, device=backend, requires_grad=True)
    y = F.linear_relu(x, weight, bias)
    assert torch.equal(y, torch.relu(bias.detach()).expand(6, 5))
    g = randn(6, 5, device=backend)
    y.backward(g)
    torch.testing.assert_close(bias.grad, torch.where(bias.detach() > 0, g.sum(0), 0.0))
    assert weight.grad.shape == (5, 0) and x.grad.shape == (6, 0)
