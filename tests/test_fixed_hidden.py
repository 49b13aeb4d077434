"""The fixed-hidden matmul relu(x @ W + c), W frozen: kernels (interpreter on CPU, GPU with
CUDA) and the torch fallback against a float64 reference; backward for x, opcheck,
compile, the FixedHiddenMatmul module (buffer semantics), errors.
Tests without the ``backend`` fixture say why in their docstring or by their nature: float64
gradchecks (float64 always runs torch; the kernel formulas are checked in fp32 against
float64 in test_parity_autograd.py), init/state_dict/repr (no op runs), CUDA-only checks."""
import pytest
import torch

import fastlayers
from fastlayers import functional as F
from fastlayers.ops import fixed_hidden as ops

from _util import assert_close_to_ref, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): ones, primes, sizes across the interpreter's 32-wide tiles, empty batch.
SHAPES = [(1, 1, 1), (7, 13, 1), (37, 45, 33), (33, 64, 31), (0, 5, 3), (31, 32, 64)]


def ref64(x, w, c):
    return torch.relu(x.double() @ w.double() + c)


def ref64_grad_x(x, w, c, gy, y=None):
    """float64 grad of x; with y given, the ReLU mask is y > 0, as torch's relu backward
    takes it from the (rounded) forward output, so 16-bit rounding near 0 cannot flip it."""
    if y is not None:
        return (gy.double() * (y.detach().double() > 0)) @ w.double().t()
    x64 = x.detach().double().requires_grad_(True)
    torch.relu(x64 @ w.double() + c).backward(gy.double())
    return x64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c", [1.0, -0.75])
def test_forward_backward_match_float64(backend, shape, dtype, c):
    M, K, N = shape
    x = randn(M, K, dtype=dtype, device=backend).requires_grad_(True)
    w = torch.rand(K, N, dtype=torch.float64).mul(K ** -0.5).to(dtype=dtype, device=backend)
    y = F.fixed_hidden(x, w, c)
    assert y.shape == (M, N) and y.dtype == dtype and y.device == x.device
    assert_close_to_ref(y, ref64(x, w, c), dtype, what="forward")
    gy = randn(M, N, dtype=dtype, device=backend)
    y.backward(gy)
    assert_close_to_ref(x.grad, ref64_grad_x(x, w, c, gy, y), dtype, what="grad_input")
    if dtype == torch.float32:  # no rounding can flip the mask here: fully independent
        assert_close_to_ref(x.grad, ref64_grad_x(x, w, c, gy), dtype, what="grad_input")


@pytest.mark.parametrize("layout", ["x_transposed", "w_transposed", "three_d", "one_d"])
def test_strided_and_ranked_inputs(backend, layout):
    K, N = 45, 33
    w = randn(K, N, device=backend, scale=0.2)
    if layout == "x_transposed":
        x = randn(K, 37, device=backend).t()
    elif layout == "w_transposed":
        x = randn(37, K, device=backend)
        w = randn(N, K, device=backend, scale=0.2).t()
    elif layout == "three_d":
        x = randn(3, 11, K, device=backend)
    else:
        x = randn(K, device=backend)
    x.requires_grad_(True)
    y = F.fixed_hidden(x, w)
    assert y.shape == (*x.shape[:-1], N)
    assert_close_to_ref(y, ref64(x, w, 1.0), what=layout)
    gy = randn(*y.shape, device=backend)
    y.backward(gy)
    assert_close_to_ref(x.grad, ref64_grad_x(x, w, 1.0, gy), what="grad_input")


def test_grad_from_sum_has_stride_zero(backend):
    x = randn(37, 45, device=backend).requires_grad_(True)
    w = randn(45, 33, device=backend, scale=0.2)
    F.fixed_hidden(x, w, 0.5).sum().backward()
    assert_close_to_ref(x.grad, ref64_grad_x(x, w, 0.5, torch.ones(37, 33)))


def test_matches_the_seeds_expression_on_cpu():
    """The torch path is the seed's F.relu(torch.mm(X, rand_weight) + 1), bit for bit."""
    x, w = torch.randn(64, 20), torch.rand(20, 20)
    with fastlayers.use_backend("torch"):
        assert torch.equal(F.fixed_hidden(x, w), torch.relu(torch.mm(x, w) + 1))


def test_gradcheck_float64():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: F.fixed_hidden(t, w, 0.3), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.fwd_op(t, w, 0.3, "ieee"), (x,))


def test_opcheck(backend):
    x = randn(9, 37, device=backend).requires_grad_(True)
    w = randn(37, 33, device=backend)
    torch.library.opcheck(ops.fwd_op, (x, w, 1.0, "ieee"))
    with torch.no_grad():
        y = ops.fwd_op(x, w, 1.0, "ieee")
    gy = randn(9, 33, device=backend)
    torch.library.opcheck(ops.bwd_input_op, (gy, y, w, "ieee"))
    torch.library.opcheck(ops.bwd_input_op, (gy.t().contiguous().t(), y, w, "tf32"))


def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = fastlayers.FixedHiddenMatmul(20, 33).to(backend)
    x = randn(4, 3, 20, device=backend).requires_grad_(True)
    eager_y = layer(x)
    eager_y.square().sum().backward()
    eager_g = x.grad.clone()
    x.grad = None
    y = torch.compile(layer, fullgraph=True)(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(x.grad, eager_g)


def test_module_weight_is_a_buffer():
    torch.manual_seed(11)
    expected = torch.rand(20, 7)
    torch.manual_seed(11)
    layer = fastlayers.FixedHiddenMatmul(20, 7)
    assert torch.equal(layer.weight, expected)  # the seed's torch.rand init
    assert list(layer.state_dict()) == ["weight"] and list(layer.parameters()) == []
    assert not layer.weight.requires_grad
    moved = layer.to(torch.float64)
    assert moved.weight.dtype == torch.float64
    other = fastlayers.FixedHiddenMatmul(20, 7)
    other.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(other.weight, layer.weight)
    x = torch.randn(5, 20, dtype=torch.float64)
    assert torch.equal(layer(x), torch.relu(x @ layer.weight + 1))
    assert repr(fastlayers.FixedHiddenMatmul(3, 4, c=2.0)) == \
        "FixedHiddenMatmul(in_features=3, out_features=4, c=2.0)"


def test_module_given_weight_and_c(backend):
    w = torch.randn(6, 4)
    layer = fastlayers.FixedHiddenMatmul(6, 4, c=-0.5, weight=w).to(backend)
    assert torch.equal(layer.weight.cpu(), w) and layer.weight.data_ptr() != w.data_ptr()
    x = randn(3, 6, device=backend)
    assert_close_to_ref(layer(x), ref64(x, w, -0.5))
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        fastlayers.FixedHiddenMatmul(6, 4, weight=torch.randn(4, 6))


@pytest.mark.parametrize("case, exc, words", [
    ("int_input", TypeError, ["input", "floating-point", "torch.int64"]),
    ("wrong_in_features", ValueError, ["in_features=8", "(3, 5)"]),
    ("device_mismatch", RuntimeError, ["weight", "meta", "cpu"]),
    ("dtype_mismatch", TypeError, ["torch.float16", "torch.float32"]),
    ("weight_rank", ValueError, ["2-D"]),
    ("weight_requires_grad", ValueError, ["frozen", "detach"]),
    ("tensor_c", TypeError, ["c must be a Python float"]),
])
def test_bad_input_gets_clear_error(backend, case, exc, words):
    x, w, c = torch.randn(3, 8), torch.rand(8, 4), 1.0
    if case == "int_input":
        x = torch.randint(0, 5, (3, 8))
    elif case == "wrong_in_features":
        x = torch.randn(3, 5)
    elif case == "device_mismatch":
        w = torch.rand(8, 4, device="meta")
    elif case == "dtype_mismatch":
        w = w.half()
    elif case == "weight_rank":
        w = torch.rand(8, 4, 1)
    elif case == "weight_requires_grad":
        w.requires_grad_(True)
    else:
        c = torch.tensor(1.0)
    with pytest.raises(exc) as info:
        F.fixed_hidden(x, w, c)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.cuda
def test_fixed_hidden_bf16_large_on_cuda():
    x = randn(65536, 256, dtype=torch.bfloat16, device="cuda")
    w = (torch.rand(256, 256, device="cuda") / 16).bfloat16()
    with fastlayers.use_backend("triton"):
        y = F.fixed_hidden(x, w)
    assert_close_to_ref(y[:4096], ref64(x[:4096], w, 1.0))
    assert_close_to_ref(y[-4096:], ref64(x[-4096:], w, 1.0))
