"""halve_until vs the literal seed loop (``reference.halve_until_loop``, same dtype) when
elements reach the subnormal range and round at each halving, so that the loop's sums are
no longer the first sum halved (issue 12 item 7): fp32, fp16, bf16 on both paths."""
import contextlib
import importlib

import pytest
import torch

from fastlayers import functional as F
from fastlayers._backend import use_triton
from fastlayers.ops import halve_until as H
from fastlayers.reference import halve_until_loop

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: (torch.int32, 23), torch.float16: (torch.int16, 10),
        torch.bfloat16: (torch.int16, 7)}


def low_range(dtype, n, gen, max_exponent=3):
    """n random values with biased exponent 0..max_exponent (subnormals and the lowest
    normal binades), random signs and mantissas, never all zero."""
    ints, P = BITS[dtype]
    E = torch.randint(0, max_exponent + 1, (n,), generator=gen)
    f = torch.randint(0, 1 << P, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen) << (torch.finfo(dtype).bits - 1)
    bits = (sign | (E << P) | f)
    bits[0] |= 1  # not all zero
    if ints == torch.int16:
        bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)
    return bits.to(ints).view(dtype)


def cases(dtype, count, gen, exact_fp32_sums=False):
    """(x, threshold) pairs whose loop runs with rounding elements: low-range inputs (also
    mixed with one big element), equal elements that all vanish at the same halving (the
    loop stops well before the first sum predicts), thresholds from tiny up.

    exact_fp32_sums: fp32 thresholds only ``tiny``, so that every fp32 sum near the
    threshold is below 2**24 quanta and exact in any order. (Larger fp32 sums round, and
    the Triton kernel's summation order is not torch's CPU order, just as a CUDA run of the
    seed sums in CUDA's order; 16-bit sums accumulate exactly in fp32 here.)"""
    tiny = torch.finfo(dtype).tiny
    q = tiny * torch.finfo(dtype).eps
    out = []
    for i in range(count):
        n = int(torch.randint(1, 300, (), generator=gen))
        kind = i % 4
        if kind == 0:
            x = low_range(dtype, n, gen)
        elif kind == 1:
            x = low_range(dtype, n, gen, max_exponent=12)
        elif kind == 2:  # n copies of q * 2**m: all become q, then 0 in one halving
            m = int(torch.randint(0, 12, (), generator=gen))
            x = torch.full((n,), q * 2.0 ** m, dtype=torch.float64).to(dtype)
        else:  # one big element decides most halvings, the small ones round
            x = low_range(dtype, n, gen)
            x[0] = float(torch.randint(1, 1 << 10, (), generator=gen)) * tiny
        s = float(x.double().abs().sum())
        choice = int(torch.randint(0, 3, (), generator=gen))
        thr = [tiny, max(tiny, s * 0.3), max(tiny, s / 2 ** int(torch.randint(
            1, 8, (), generator=gen)))][choice]
        if exact_fp32_sums and dtype == torch.float32:
            thr = tiny
        out.append((x, thr))
    return out


@contextlib.contextmanager
def one_program_limit(limit):
    """Kernel path: halve_until in one program up to ``limit`` elements (0: never, so the
    three-launch path with its count kernel runs)."""
    kernels = importlib.import_module("fastlayers.kernels.halve_until")
    saved, kernels.ONE_MAX = kernels.ONE_MAX, limit
    try:
        yield
    finally:
        kernels.ONE_MAX = saved


def check(x, threshold):
    """The loop's count and bits; on the kernel path both launch plans (one program,
    and partials + count + scale)."""
    ref, ref_k = halve_until_loop(x.cpu(), threshold)
    for limit in ((None, 0) if use_triton(x) else (None,)):
        with one_program_limit(limit) if limit is not None else contextlib.nullcontext():
            y, k = F.halve_until(x, threshold, return_count=True)
        where = f"({x.dtype}, n={x.numel()}, one-program limit {limit})"
        assert int(k) == ref_k, f"count {int(k)} != the loop's {ref_k} {where}"
        assert torch.equal(y.cpu().view(BITS[x.dtype][0]), ref.view(BITS[x.dtype][0])), where


def test_issue_example(backend):
    x = torch.tensor([4194303, 4194303, 4194303, 4194307], dtype=torch.int32).view(
        torch.float32)
    t = torch.finfo(torch.float32).tiny
    assert halve_until_loop(x, t)[1] == 2
    check(x.to(backend), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_elements_match_the_loop(backend, dtype):
    gen = torch.Generator().manual_seed(12)
    for x, thr in cases(dtype, 24, gen, exact_fp32_sums=True):
        check(x.to(backend), thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_elements_many_cases_torch_path(dtype):
    """More cases on the (fast) torch path, with the count's window also checked: the
    loop's k lies in k0 - 1 - D .. k0 + 1 (the bound ``window_below`` derives)."""
    gen = torch.Generator().manual_seed(99)
    lowest_seen = highest_seen = 0
    for x, thr in cases(dtype, 400, gen):
        check(x, thr)
        t = H.threshold_in(dtype, thr)
        k = halve_until_loop(x, thr)[1]
        s0 = x.abs().sum()
        k0 = 0 if s0 <= t else int(H._halvings(s0, t))
        below = H.window_below(x.numel(), dtype, t)
        assert k0 - 1 - below <= k <= k0 + 1
        lowest_seen, highest_seen = min(lowest_seen, k - k0), max(highest_seen, k - k0)
    assert lowest_seen == -1 and highest_seen == 1  # the window's both ends are exercised


@pytest.mark.parametrize("dtype, n, m", [(torch.bfloat16, 2000, 5), (torch.float16, 20000, 3)])
def test_elements_vanishing_together_stop_the_loop_early(backend, dtype, n, m):
    """n copies of q * 2**m (q: the smallest subnormal) all become q after m halvings and 0
    at the next: the loop stops there, several halvings before the first sum predicts."""
    fi = torch.finfo(dtype)
    x = torch.full((n,), fi.tiny * fi.eps * 2.0 ** m, dtype=dtype)
    t = fi.tiny
    k = halve_until_loop(x, t)[1]
    s0 = x.abs().sum()
    assert k == m + 1 and int(H._halvings(s0, t)) - k >= 3
    assert H.window_below(n, dtype, t) >= 3
    check(x.to(backend), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_big_sum_with_rounding_small_elements(backend, dtype):
    """Sums far above the threshold for most halvings while small elements round: the
    count still is the loop's (the window is evaluated)."""
    gen = torch.Generator().manual_seed(5)
    tiny = torch.finfo(dtype).tiny
    for big in (1.0, 3.0, 1000.0, 40000.0):
        x = torch.cat([torch.tensor([big], dtype=dtype), low_range(dtype, 61, gen, 6)])
        for thr in (tiny, 1e-3):  # sums near 1e-3 ignore the small elements in any order
            check(x.to(backend), thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_loop_and_device_route_agree_with_the_loop(dtype):
    """Both torch formulations on the rounding cases: the CPU's own (``_cpu_halve``, the
    loop from the window's low end where its exact shortcut does not hold) and the route
    CUDA tensors take without host reads (torch_count + halve_bits, run here on CPU)."""
    gen = torch.Generator().manual_seed(31)
    ints = BITS[dtype][0]
    loops = 0
    for x, thr in cases(dtype, 200, gen):
        t = H.threshold_in(dtype, thr)
        ref, ref_k = halve_until_loop(x, thr)
        y, k = H._cpu_halve(x, t)
        assert k == ref_k and torch.equal(y.view(ints), ref.view(ints))
        loops += H._cpu_halve(x, t, exact_only=True) is None
        k = H.torch_count(x, t)
        assert int(k) == ref_k and torch.equal(H.halve_bits(x, k).view(ints), ref.view(ints))
    assert loops >= 150, loops  # most of these cases take the loop
