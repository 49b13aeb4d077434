"""FixedHiddenMLP as a drop-in for the seed's block (fused small-d kernel, the composed
path, torch fallback) against a literal copy of the seed's module and a float64
reference: same loop count, gradients, state_dicts from the seed, errors. NestMLP,
MySequential and the seed's chain are in test_nest_and_sequential.py.
Tests without the ``backend`` fixture say why in their docstring or by their nature: float64
gradchecks (float64 always runs torch; the kernel formulas are checked in fp32 against
float64 in test_parity_autograd.py), init/state_dict/repr (no op runs), CUDA-only checks."""
import math

import pytest
import torch
import torch.nn.functional as TF

import fastlayers
from fastlayers import functional as F
from fastlayers.tour.seed import FixedHiddenMLPEager as SeedFixedHiddenMLP
from fastlayers.ops import fixed_hidden_mlp as ops
from fastlayers.ops.halve_until import window_below

from _util import REL_TOL, assert_close_to_ref, randn
from conftest import requires_triton

# the interpreter's numpy warns on fp32 overflow to inf, which these tests mean to cause
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def loop_count(y, threshold=1.0):
    k = 0
    y = y.clone()
    while y.abs().sum() > threshold:
        y /= 2
        k += 1
    return k


def body64(x, w, b, r, c=1.0, mask=None):
    """float64 y of the block before halving (one Linear used twice). mask: optional ReLU
    mask to use instead of the float64 one (the rounded forward's, for 16-bit grads)."""
    x, w, r = x.double(), w.double(), r.double()
    b = None if b is None else b.double()
    z = TF.linear(x, w, b) @ r + c
    h2 = torch.relu(z) if mask is None else z * mask
    return TF.linear(h2, w, b)


def lowp_mask(x, w, b, r, c=1.0):
    """The ReLU mask of the seed's expression evaluated in x's dtype (on CPU)."""
    x, w, b, r = (t.detach().cpu() for t in (x, w, b, r))
    return (torch.relu(torch.mm(TF.linear(x, w, b), r) + c) > 0).to(x.device)


def params(d, dtype, device, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    w = (torch.rand(d, d, generator=g, dtype=torch.float64) * 2 - 1) * d ** -0.5
    b = torch.rand(d, generator=g, dtype=torch.float64) * 2 - 1
    r = torch.rand(d, d, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (w, b, r)]


# ------------------------------------------------------------------ FixedHiddenMLP
def test_same_init_and_bitwise_same_output_as_the_seed_on_cpu():
    torch.manual_seed(0)
    seed = SeedFixedHiddenMLP()
    torch.manual_seed(0)
    ours = fastlayers.FixedHiddenMLP()
    assert torch.equal(seed.rand_weight, ours.rand_weight)
    assert torch.equal(seed.linear.weight, ours.linear.weight)
    with fastlayers.use_backend("torch"):
        for B in (1, 2, 37, 4096):
            x = torch.randn(B, 20)
            with torch.no_grad():
                expected = seed(x)
                y, k = ours.forward_with_count(x)
            assert torch.equal(y, expected)
            assert int(k) == loop_count(ours.linear(torch.relu(
                ours.linear(x) @ ours.rand_weight + 1)).detach())


def _forward(x, w, b, r, reduce, path):
    if path == "functional":
        return F.fixed_hidden_mlp(x, w, b, r, reduce=reduce, return_count=True)
    from fastlayers.kernels import fixed_hidden_mlp as K
    window = window_below(x.numel(), x.dtype, 1.0)  # 1.0: the threshold in every dtype
    out, k, _ = K.fixed_hidden_mlp_fwd(x, w, b, r, 1.0, 1.0, window, reduce == "sum", False,
                                path=path)
    return out, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_forward_matches_float64_and_the_loop_count(backend, dtype, reduce):
    """Triton: the fused kernel (d <= 64) and the composed GEMMs; torch: the fallback.
    The count equals the literal loop's on the float64 output (these sums are not within
    rounding of a power-of-two boundary, so every path must find the same count)."""
    paths = ["functional"] + (["fused", "composed"] if fastlayers.get_backend() == "triton"
                              else [])
    for path in paths:
        cases = [(37, 20), (1, 20), (5, 33), (17, 7)] + ([(3, 70)] if path != "fused" else [])
        for B, d in cases:
            w, b, r = params(d, dtype, backend, gen_seed=B)
            x = randn(B, d, dtype=dtype, device=backend)
            with torch.no_grad():
                out, k = _forward(x, w, b, r, reduce, path)
            y64 = body64(x, w, b, r)
            k64 = loop_count(y64)
            assert int(k) == k64, f"{path}: count {int(k)} != the loop's {k64}"
            ref = y64 * 2.0 ** -k64
            assert_close_to_ref(out, ref.sum() if reduce == "sum" else ref, dtype,
                                tol=None if reduce is None else 20 * _tol(dtype),
                                what=f"{path} B={B} d={d}")


def _tol(dtype):
    return REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_gradients_match_float64(backend, dtype, reduce):
    for B, d in [(19, 20), (6, 40)]:
        mlp = fastlayers.FixedHiddenMLP(d, reduce=reduce).to(device=backend, dtype=dtype)
        x = randn(B, d, dtype=dtype, device=backend).requires_grad_(True)
        out, k = mlp.forward_with_count(x)
        g = torch.randn(out.shape, dtype=torch.float64).to(dtype=dtype, device=backend)
        out.backward(g)
        # float64 reference with the same count (k is constant almost everywhere)
        x64 = x.detach().double().requires_grad_(True)
        w64 = mlp.linear.weight.detach().double().requires_grad_(True)
        b64 = mlp.linear.bias.detach().double().requires_grad_(True)
        mask = None if dtype == torch.float32 else lowp_mask(
            x, mlp.linear.weight, mlp.linear.bias, mlp.rand_weight).to(backend)
        y64 = body64(x64, w64, b64, mlp.rand_weight, mask=mask) * 2.0 ** -int(k)
        (y64.sum() if reduce == "sum" else y64).backward(g.double())
        tol = 4 * _tol(dtype)  # three chained matmuls
        assert_close_to_ref(x.grad, x64.grad, dtype, tol=tol, what="grad x")
        assert_close_to_ref(mlp.linear.weight.grad, w64.grad, dtype, tol=tol, what="grad W")
        assert_close_to_ref(mlp.linear.bias.grad, b64.grad, dtype, tol=tol, what="grad b")


def test_gradcheck_float64():
    w = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    r = torch.rand(6, 6, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    for reduce in (None, "sum"):
        assert torch.autograd.gradcheck(
            lambda *a, red=reduce: F.fixed_hidden_mlp(*a, r, reduce=red), (x, w, b))
        # the op-level path used under torch.compile
        assert torch.autograd.gradcheck(
            lambda *a, s=reduce == "sum": ops.FixedHiddenMLPFunction.apply(
                *a, r, 1.0, 1.0, s, "ieee")[0],
            (x, w, b))


def test_opcheck(backend):
    w, b, r = params(20, torch.float32, backend)
    x = randn(9, 20, device=backend)
    for reduce_sum in (False, True):
        for save in (False, True):
            torch.library.opcheck(ops.fwd_op, (x, w, b, r, 1.0, 1.0, reduce_sum, save, "ieee"))
    _, k, h2 = ops.fwd_op(x, w, b, r, 1.0, 1.0, False, True, "ieee")
    gy = randn(9, 20, device=backend)
    torch.library.opcheck(ops.bwd_op, (gy, x, w, r, h2, k, False, "ieee"))
    torch.library.opcheck(ops.bwd_op, (gy[0, 0], x, w, r, h2, k, True, "ieee"))


def test_shapes_empty_batch_and_leading_dims(backend):
    mlp = fastlayers.FixedHiddenMLP().to(backend)
    x = randn(3, 5, 20, device=backend)
    y = mlp(x)
    assert y.shape == (3, 5, 20)
    flat, _ = mlp.forward_with_count(x.reshape(15, 20))
    assert torch.equal(y.reshape(15, 20), flat)
    empty = mlp(torch.empty(0, 20, device=backend))
    assert empty.shape == (0, 20)
    s = fastlayers.FixedHiddenMLP(reduce="sum").to(backend)(torch.empty(0, 20, device=backend))
    assert s.shape == () and float(s.detach()) == 0.0


def test_inf_and_nan_return_quickly_and_check_raises(backend, monkeypatch):
    mlp = fastlayers.FixedHiddenMLP().to(backend)
    with torch.no_grad():  # all-positive weights and an inf bias: y is +inf everywhere,
        mlp.linear.weight.abs_()  # so the seed's loop would never end
        mlp.linear.bias[0] = math.inf
    x = randn(4, 20, device=backend)
    y, k = mlp.forward_with_count(x)
    assert int(k) == 2 ** 31 - 1 and torch.isinf(y).all() and (y > 0).all()
    monkeypatch.setattr(fastlayers.settings, "check", True)
    with pytest.raises(ValueError, match="never end"):
        mlp(x)
    x[1, 3] = math.nan  # NaN reaches y: the seed's loop stops at once
    y, k = fastlayers.FixedHiddenMLP().to(backend).forward_with_count(x)
    assert int(k) == 0 and torch.isnan(y[1]).all()


def test_seed_state_dict_loads_strictly_and_rand_weight_story():
    seed = SeedFixedHiddenMLP()
    ours = fastlayers.FixedHiddenMLP()
    assert set(ours.state_dict()) == {"rand_weight", "linear.weight", "linear.bias"}
    assert set(seed.state_dict()) == {"linear.weight", "linear.bias"}
    kept = ours.rand_weight.clone()
    result = ours.load_state_dict(seed.state_dict(), strict=True)  # no rand_weight in it
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(ours.rand_weight, kept)  # kept as is
    assert torch.equal(ours.linear.weight, seed.linear.weight)
    # the documented ways to carry the seed's tensor over
    ours.load_state_dict({**seed.state_dict(), "rand_weight": seed.rand_weight})
    assert torch.equal(ours.rand_weight, seed.rand_weight)
    copy = fastlayers.FixedHiddenMLP.from_seed(seed)
    x = torch.randn(8, 20)
    with fastlayers.use_backend("torch"), torch.no_grad():
        assert torch.equal(copy(x), seed(x))
    seed2 = SeedFixedHiddenMLP()
    seed2.load_state_dict(ours.state_dict(), strict=False)  # the seed ignores rand_weight
    assert torch.equal(seed2.linear.bias, ours.linear.bias)
    # a wrong-shaped rand_weight is still an error
    with pytest.raises(RuntimeError, match="rand_weight"):
        ours.load_state_dict({**seed.state_dict(), "rand_weight": torch.rand(3, 3)})


def test_from_seed_returns_what_the_seed_returns(backend):
    """The book's module (LazyLinear, returns X.sum()) and the eager copy with either
    reduce: the copy's output is the seed's (bitwise on the torch path)."""
    from fastlayers.tour.seed import FixedHiddenMLP as BookFixedHiddenMLP
    torch.manual_seed(1)
    book = BookFixedHiddenMLP()
    x = torch.randn(6, 20)
    book(x)  # materialise its LazyLinear
    seeds = [book, SeedFixedHiddenMLP(reduce="sum"), SeedFixedHiddenMLP()]
    for seed, reduce in zip(seeds, ["sum", "sum", None]):
        copy = fastlayers.FixedHiddenMLP.from_seed(seed).to(backend)
        assert copy.reduce == reduce
        with torch.no_grad():
            want, got = seed(x), copy(x.to(backend)).cpu()
        assert got.shape == want.shape
        if backend == "cpu" and fastlayers.get_backend() == "torch":
            assert torch.equal(got, want)
        else:
            assert_close_to_ref(got, want.double(), torch.float32, tol=20 * REL_TOL[torch.float32])
    assert fastlayers.FixedHiddenMLP.from_seed(book, reduce=None).reduce is None


def test_to_moves_the_buffer_and_dtype():
    mlp = fastlayers.FixedHiddenMLP(reduce="sum").to(torch.float64)
    assert mlp.rand_weight.dtype == torch.float64 and mlp.linear.weight.dtype == torch.float64
    assert list(mlp.parameters()) == [mlp.linear.weight, mlp.linear.bias]
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = body64(x, mlp.linear.weight, mlp.linear.bias, mlp.rand_weight)
    expected = expected * 2.0 ** -loop_count(expected)
    torch.testing.assert_close(mlp(x), expected.sum(), rtol=1e-12, atol=0)
    assert "reduce='sum'" in repr(mlp)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("case, exc, words", [
    ("int_input", TypeError, ["input", "floating-point", "torch.int64"]),
    ("wrong_features", ValueError, ["in_features=20", "(3, 7)"]),
    ("dtype_mismatch", TypeError, ["torch.float16", "torch.float32"]),
    ("device_mismatch", RuntimeError, ["meta", "cpu", "module.to"]),
    ("bad_reduce", ValueError, ["reduce", "'mean'"]),
])
def test_bad_input_gets_clear_error(backend, case, exc, words):
    mlp = fastlayers.FixedHiddenMLP()
    x = torch.randn(3, 20)
    if case == "int_input":
        x = torch.randint(0, 5, (3, 20))
    elif case == "wrong_features":
        x = torch.randn(3, 7)
    elif case == "dtype_mismatch":
        x = x.half()
    elif case == "device_mismatch":
        mlp.rand_weight = torch.rand(20, 20, device="meta")
    with pytest.raises(exc) as info:
        if case == "bad_reduce":
            fastlayers.FixedHiddenMLP(reduce="mean")
        mlp(x)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@requires_triton
def test_fused_path_refuses_large_d():
    from fastlayers.kernels import fixed_hidden_mlp as K
    w, b, r = params(70, torch.float32, "cpu")
    with pytest.raises(ValueError, match="d <= 64"):
        K.fixed_hidden_mlp_fwd(torch.randn(2, 70), w, b, r, 1.0, 1.0, 0, False, False,
                               path="fused")


# ------------------------------------------------------------------ GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("B", [2, 4096, 2 ** 20])
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_gpu_sizes_match_the_seed_count_and_float64(B, reduce):
    torch.manual_seed(0)
    mlp = fastlayers.FixedHiddenMLP(reduce=reduce).cuda()
    x = torch.randn(B, 20, device="cuda")
    with fastlayers.use_backend("triton"), torch.no_grad():
        out, k = mlp.forward_with_count(x)
    y64 = body64(x, mlp.linear.weight, mlp.linear.bias, mlp.rand_weight)
    assert int(k) == loop_count(y64)
    ref = y64 * 2.0 ** -int(k)
    assert_close_to_ref(out, ref.sum() if reduce == "sum" else ref,
                        tol=2e-6 if reduce is None else 1e-4)


@pytest.mark.cuda
def test_gpu_forward_is_sync_free():
    mlp = fastlayers.FixedHiddenMLP().cuda()
    x = torch.randn(4096, 20, device="cuda")
    with fastlayers.use_backend("triton"), torch.no_grad():
        mlp(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mlp(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
