"""halve_until vs a literal copy of the seed's loop: bitwise on every finite input (random,
huge, tiny, mixed magnitudes, exact powers of two, subnormal results, fp16 sums moved by
subnormal rounding, the fp32 overflow case), inf/NaN inputs, thresholds, gradient,
opcheck, compile, errors; the bit-level halving formula exhaustively for 16-bit formats."""
import math

import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers import functional as F
from fastlayers.ops import halve_until as H

from conftest import HAS_CUDA, KERNEL_DEVICE, requires_triton

# the interpreter's numpy warns on fp32 overflow to inf, which these tests mean to cause
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


seed_loop = reference.halve_until_loop  # the seed's loop, literally, with a counter


def random_cases(dtype, count, gen):
    """Random finite inputs of many kinds (never all zeros), 1-D and 2-D, odd sizes."""
    out = []
    for i in range(count):
        n = int(torch.randint(1, 700, (), generator=gen))
        kind = i % 6
        base = torch.randn(n, dtype=torch.float64, generator=gen)
        scale = 10.0 ** float(torch.empty((), dtype=torch.float64).uniform_(-7, 5, generator=gen))
        if kind == 0:  # one magnitude
            x = base * scale
        elif kind == 1:  # mixed magnitudes over many decades
            x = base * torch.exp(torch.randn(n, dtype=torch.float64, generator=gen) * 4) * scale
        elif kind == 2:  # a few huge elements among small ones: the small go subnormal
            x = base * 1e-3
            x[: max(1, n // 50)] *= 1e7
        elif kind == 3:  # small integers times a power of two: exact sums, boundaries
            x = torch.randint(-8, 9, (n,), generator=gen).double() * 2.0 ** int(
                torch.randint(-12, 6, (), generator=gen))
            x[0] = 1.0
        elif kind == 4:  # huge
            x = base * (1e4 if dtype == torch.float16 else 1e30)
        else:  # tiny (elements near the smallest normal of the dtype)
            x = base * torch.finfo(dtype).tiny * 8 * n
        x = x.to(dtype)
        if not torch.isfinite(x).all():
            x = torch.nan_to_num(x, posinf=1.0, neginf=-1.0)
        out.append(x if i % 4 else x.reshape(1, -1))
    return out


def special_cases(dtype):
    """Hand-picked boundaries: sums of exactly 1 and 2, powers of two, subnormal results."""
    t = torch.tensor
    cases = [
        t([1.0]), t([1.0, 1.0]), t([0.5, 0.25, 0.25]), t([2.0 ** -3] * 16), t([3.0]),
        t([1.0, -1.0, 1.0, -1.0]), t([0.75, 0.25 + 2 ** -10]), t([2.0 ** 10] * 3),
        t([0.0, 0.0]), t([-0.0, 4.0]),
        torch.zeros(0),
        # the big element decides k; the small ones end subnormal (rounded at each halving)
        t([1000.0] + [torch.finfo(dtype).tiny * 3.75] * 5 + [-torch.finfo(dtype).tiny * 1.25]),
        t([2.0 ** 12, 5 * torch.finfo(dtype).smallest_normal * 2.0 ** -3]),
    ]
    return [c.to(dtype) for c in cases]


def fp16_subnormal_sums():
    """fp16 inputs whose halved elements go subnormal so that the loop's sum is NOT the
    first sum halved: a count from one plain sum would be off by one here."""
    return [torch.full((n,), v, dtype=torch.float16)
            for v, n in [(9.16123e-05, 21850), (0.000183225, 43685), (0.000366449, 21850)]]


def check_bitwise(x, threshold=1.0):
    y, k = F.halve_until(x, threshold, return_count=True)
    ref, ref_k = seed_loop(x.cpu(), threshold)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert k.dtype == torch.int32 and k.shape == () and k.device == x.device
    assert int(k) == ref_k, f"count {int(k)} != the loop's {ref_k} for {x.dtype} {x.shape}"
    assert torch.equal(y.cpu(), ref), f"values differ from the loop ({(y.cpu() != ref).sum()})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_seed_loop_bitwise_on_random_inputs(backend, dtype):
    gen = torch.Generator().manual_seed(1234)
    for x in random_cases(dtype, 36, gen):
        check_bitwise(x.to(backend))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_seed_loop_on_boundaries_and_subnormal_results(backend, dtype):
    for x in special_cases(dtype):
        check_bitwise(x.to(backend))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_inputs_with_exact_zeros(backend, dtype):
    """ReLU outputs (about half exact zeros, odd sizes) match the loop bitwise. On the CPU
    torch path they take the host common case: zeros halve exactly, so they must not send
    it to the device route (26x slower at 64x20)."""
    gen = torch.Generator().manual_seed(77)
    for shape in [(64, 20), (3, 7), (1,), (257,)]:
        x = torch.relu(torch.randn(shape, dtype=torch.float64, generator=gen) * 30).to(dtype)
        x.view(-1)[0] = 0.0  # at least one zero
        check_bitwise(x.to(backend))
        if dtype != torch.float16 and dtype != torch.bfloat16:  # the host case: fp32/fp64
            assert H._cpu_halve(x, H.threshold_in(dtype, 1.0), exact_only=True) is not None, shape
    # a nonzero element that would round is not the common case, zeros or not
    x = torch.tensor([0.0, 3.0, torch.finfo(torch.float32).tiny * 1.5, 0.0])
    assert H._cpu_halve(x, 1.0, exact_only=True) is None
    check_bitwise(x.to(backend))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_fp16_sum_overflowing_while_elements_round(backend, layout):
    """fp16, 300x300 of randn * 3: the first sums overflow to inf and most elements reach
    the subnormal range before the loop ends (the CPU takes the loop from the window's
    low end, not the device route: 3.4 ms -> 0.33 ms at 4096x20)."""
    x = (torch.randn(300, 300, generator=torch.Generator().manual_seed(4)) * 3).half()
    x = {"contiguous": x, "transposed": x.t(), "sliced": x[:, ::3]}[layout]
    assert x.abs().sum() == math.inf
    check_bitwise(x.to(backend))


def test_fp16_sums_moved_by_subnormal_rounding(backend):
    """The loop's count here differs from the count the first sum alone would give."""
    for x in fp16_subnormal_sums():
        _, k = seed_loop(x)
        s = float(x.abs().sum())
        assert k != math.ceil(math.log2(s)), "case no longer exercises the subnormal drift"
        check_bitwise(x.to(backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_sum_overflow_still_gets_the_loops_answer(backend, dtype):
    x = torch.full((12,), 3.0e38, dtype=dtype)
    x[1::3] *= -0.7
    assert x.abs().sum() == math.inf and torch.isfinite(x).all()
    check_bitwise(x.to(backend))


@pytest.mark.parametrize("threshold", [0.1, 3.0, 1e-3, 12345.0, 1.0006, 1 + 2 ** -11 + 2 ** -40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_thresholds(backend, dtype, threshold):
    gen = torch.Generator().manual_seed(7)
    for x in random_cases(dtype, 6, gen) + special_cases(dtype)[:6]:
        check_bitwise(x.to(backend), threshold)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_rounds_like_torchs_comparison(dtype):
    """The rounding the op applies to the threshold is the one `tensor > threshold` uses."""
    for thr in [1.0006, 1 + 2 ** -11 + 2 ** -40, 0.1, 3.3, 65519.0, 1e-4, 7.0000001]:
        t = H.threshold_in(dtype, thr)
        assert t == float(torch.tensor(thr, dtype=dtype))
        at = torch.tensor(t, dtype=dtype)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        above = (at.view(bits) + 1).view(dtype)  # the next value up (t > 0)
        assert not bool(at > thr) and bool(above > thr)


def test_infinite_threshold_never_halves(backend):
    """`sum > inf` is never true: k = 0 and y = x, also for an infinite element or a sum
    that overflows to inf (the device route's count too, taken under vmap)."""
    rows = torch.tensor([[1e30, -3.0, float("inf")], [3.4e38, 3.4e38, -1.0]], device=backend)
    for x in rows:
        y, k = F.halve_until(x, math.inf, return_count=True)
        assert int(k) == 0 and torch.equal(y, x), x
    y, k = torch.func.vmap(lambda r: F.halve_until(r, math.inf, return_count=True))(rows)
    assert torch.equal(k, torch.zeros(2, dtype=torch.int32, device=backend))
    assert torch.equal(y, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_input_returns_the_loops_limit_quickly(backend, dtype):
    """The seed spins forever on ±inf; ours returns its limit: finite -> signed 0."""
    x = torch.tensor([1.5, float("inf"), -3.0, -1e-3, 0.0, -float("inf")], dtype=dtype,
                     device=backend)
    y, k = F.halve_until(x, return_count=True)
    assert int(k) == H.K_FOREVER
    expected = torch.tensor([0.0, float("inf"), -0.0, -0.0, 0.0, -float("inf")], dtype=dtype)
    assert torch.equal(y.cpu(), expected)
    assert torch.equal(torch.signbit(y.cpu()), torch.signbit(expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_stops_at_once_like_the_seed(backend, dtype):
    for vals in ([1e4, float("nan"), -3.0], [float("nan"), float("inf"), 2.0]):
        x = torch.tensor(vals, dtype=dtype, device=backend)
        y, k = F.halve_until(x, return_count=True)
        ref, ref_k = seed_loop(x.cpu())  # NaN > 1 is False: the loop never runs
        assert int(k) == ref_k == 0
        assert torch.equal(torch.isnan(y.cpu()), torch.isnan(ref))
        assert torch.equal(y.cpu().nan_to_num(), ref.nan_to_num())


def test_fastlayers_check_raises_on_inf(backend, monkeypatch):
    monkeypatch.setattr(fastlayers.settings, "check", True)
    x = torch.tensor([1.0, float("inf")], device=backend)
    with pytest.raises(ValueError, match="never end"):
        F.halve_until(x)
    y = F.halve_until(torch.tensor([4.0, float("nan")], device=backend))  # NaN: no error
    assert torch.isnan(y[1])
    monkeypatch.setattr(fastlayers.settings, "check", False)
    assert torch.equal(F.halve_until(x).cpu(), torch.tensor([0.0, float("inf")]))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "three_d"])
def test_strided_inputs(backend, layout):
    base = torch.randn(40, 30, device=backend) * 7
    x = {"transposed": base.t(), "sliced": base[::3, 1::2],
         "three_d": base.reshape(4, 10, 30)}[layout]
    check_bitwise(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_grad_times_two_to_minus_k(backend, dtype):
    x = (torch.randn(33, 7, device=backend) * 50).to(dtype).requires_grad_(True)
    y, k = F.halve_until(x, return_count=True)
    g = torch.randn(33, 7, device=backend).to(dtype)
    y.backward(g)
    assert int(k) > 5
    assert torch.equal(x.grad, (g.float() * 2.0 ** -int(k)).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_cpu_eager_gradient_routes(dtype):
    """CPU torch path, eager autograd: the host common case is torch's own exact multiply
    (MulBackward0 carries g * 2**-k); an input whose elements round keeps the Function.
    Both give the loop's y and the factor 2**-k (rounded once), and no second derivative."""
    gen = torch.Generator().manual_seed(8)
    tiny = torch.finfo(dtype).tiny
    common = (torch.randn(9, 5, dtype=torch.float64, generator=gen) * 40).to(dtype)
    rounds = torch.cat([common.view(-1), torch.tensor([tiny * 3], dtype=dtype)])
    with fastlayers.use_backend("torch"):
        for x, node in [(common, "MulBackward0"), (rounds, "HalveUntilFunctionBackward")]:
            x = x.clone().requires_grad_(True)
            y, k = F.halve_until(x, return_count=True)
            ref, ref_k = seed_loop(x.detach())
            assert type(y.grad_fn).__name__ == node and int(k) == ref_k > 0
            assert torch.equal(y.detach(), ref)
            g = torch.randn(x.shape, dtype=torch.float64, generator=gen).to(dtype)
            (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
            assert torch.equal(gx.detach(), (g.double() * 2.0 ** -ref_k).to(dtype))
            if gx.requires_grad:  # the gradient does not depend on x
                (ggx,) = torch.autograd.grad(gx.sum(), x, allow_unused=True)
                assert ggx is None or not ggx.any()


def test_gradient_of_inf_input_is_zero(backend):
    x = torch.tensor([1.0, float("inf")], device=backend, requires_grad=True)
    F.halve_until(x).sum().backward()
    assert torch.equal(x.grad.cpu(), torch.zeros(2))


def test_gradcheck_float64():
    x = (torch.randn(5, 4, dtype=torch.float64) * 30).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: F.halve_until(t), (x,))


def test_opcheck(backend):
    for dtype in DTYPES:
        x = (torch.randn(9, 37, device=backend) * 40).to(dtype).requires_grad_(True)
        torch.library.opcheck(H.op, (x, 1.0))
        torch.library.opcheck(H.op, (x.detach()[:, ::2], 0.5))
        torch.library.opcheck(H.op, (x.detach().t(), 2.0))


def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def f(x):
        return F.halve_until(x * 3, 2.0) + 1

    x = (torch.randn(6, 20, device=backend) * 100).requires_grad_(True)
    eager_y = f(x)
    eager_y.square().sum().backward()
    eager_g = x.grad.clone()
    x.grad = None
    y = torch.compile(f, fullgraph=True)(x)
    y.square().sum().backward()
    assert torch.equal(y, eager_y) and torch.equal(x.grad, eager_g)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_halving_formula_exhaustive_16_bit(dtype):
    """Every 16-bit pattern halved k = 0..27 times: the kernel's and the torch formula's
    bits equal k literal ``/= 2`` steps (repeated rounding of subnormals included)."""
    from fastlayers.kernels import halve_until as kh
    x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(x)
    lit = x.clone()
    for kk in range(28):
        k = torch.tensor(kk, dtype=torch.int32, device=KERNEL_DEVICE)
        ours = H.halve_bits(x, k.cpu())
        kern = kh.halve_scale(x.to(KERNEL_DEVICE), k).cpu()
        for got in (ours, kern):
            same = torch.where(finite, got.view(torch.int16) == lit.view(torch.int16),
                               torch.isnan(got) == torch.isnan(x))
            assert same.all(), f"{int((~same).sum())} patterns differ at k={kk}"
        lit /= 2


@requires_triton
def test_halving_formula_fp32_random_bits():
    from fastlayers.kernels import halve_until as kh
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), dtype=torch.int64, generator=gen)
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    x = torch.cat([x, x * 2.0 ** -100, x * 2.0 ** -120])  # many subnormal results
    lit = x.clone()
    for kk in range(60):
        k = torch.tensor(kk, dtype=torch.int32)
        if kk % 7 == 0 or kk > 25:
            assert torch.equal(H.halve_bits(x, k).view(torch.int32), lit.view(torch.int32))
            kern = kh.halve_scale(x.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE)).cpu()
            assert torch.equal(kern.view(torch.int32), lit.view(torch.int32))
        lit /= 2


def test_device_side_count_equals_host_count():
    """The branch-free count used for CUDA tensors on the torch path (no host reads: run
    here on CPU tensors) agrees with the loop, the overflow case included."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        xs = random_cases(dtype, 24, gen) + [torch.full((5,), 3e38, dtype=dtype)]
        for x in xs:
            t = H.threshold_in(dtype, 1.0)
            assert int(H.torch_count(x, t)) == seed_loop(x)[1]
    for x in fp16_subnormal_sums():
        assert int(H.torch_count(x, 1.0)) == seed_loop(x)[1]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor([3.0, math.nan, 1e30 if dtype != torch.float16 else 6e4], dtype=dtype)
        assert int(H.torch_count(x, 1.0)) == seed_loop(x)[1] == 0  # NaN: never halves
        x[1] = -math.inf  # the loop never ends
        assert int(H.torch_count(x, 1.0)) == H.K_FOREVER


@pytest.mark.parametrize("case, exc, words", [
    ("int_input", TypeError, ["input", "floating-point", "torch.int64"]),
    ("negative_threshold", ValueError, ["threshold must be > 0, got -1.0", "forever"]),
    ("zero_threshold", ValueError, ["threshold must be > 0, got 0.0", "every element is 0"]),
    ("nan_threshold", ValueError, ["threshold must be > 0, got nan", "never starts"]),
    ("tiny_threshold", ValueError, ["smallest normal", "float16"]),
    ("tensor_threshold", TypeError, ["Python float", "sync"]),
])
def test_bad_input_gets_clear_error(case, exc, words):
    x, thr = torch.randn(5), 1.0
    if case == "int_input":
        x = torch.randint(0, 5, (5,))
    elif case == "negative_threshold":
        thr = -1.0
    elif case == "zero_threshold":
        thr = 0.0
    elif case == "nan_threshold":
        thr = math.nan
    elif case == "tiny_threshold":
        x, thr = x.half(), 1e-6
    else:
        thr = torch.tensor(1.0)
    with pytest.raises(exc) as info:
        F.halve_until(x, thr)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.cuda
def test_large_fp32_input_on_cuda_matches_loop():
    x = torch.randn(2 ** 22 + 5, device="cuda") * 3
    with fastlayers.use_backend("triton"):
        check_bitwise(x)
    assert HAS_CUDA
