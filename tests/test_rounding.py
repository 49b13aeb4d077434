""""Each output is rounded once to the input dtype" (README, Numerics), bit for bit on both
paths: on data whose fp32 computation is exact (small multiples of a power of two), every
16-bit output must equal the exact float64 result rounded once, round-to-nearest-even.
The data is checked to be discriminating: rounding twice, or truncating, gives another
answer somewhere. Also: sparse and nested inputs take torch's own ops on both paths."""
import pytest
import torch
import torch.nn.functional as torchF

import fastlayers
from fastlayers import functional as F

from conftest import HAS_TRITON, requires_triton

LOW = [torch.float16, torch.bfloat16]


def grid(*shape, lo=-40, hi=41, step=1 / 8, device="cpu", gen=0):
    """Random multiples of ``step`` in [lo, hi) * step, as float64 (exact in 16 bits)."""
    g = torch.Generator().manual_seed(gen)
    return (torch.randint(lo, hi, shape, generator=g).double() * step).to(device)


def truncated(v64: torch.Tensor, dtype) -> torch.Tensor:
    """v rounded toward zero to ``dtype`` (what a truncating conversion gives)."""
    near = v64.to(dtype)
    over = near.double().abs() > v64.abs()
    return torch.where(over, torch.nextafter(near, torch.zeros_like(near)), near)


def assert_once_rounded(got, exact64, dtype, also_not=()):
    want = exact64.to(dtype)
    assert got.dtype == dtype
    bad = (got.double() != want.double()).sum().item()
    assert bad == 0, f"{bad} of {want.numel()} elements not the exact value rounded once"
    for name, other in also_not:  # the data tells these roundings apart
        assert not torch.equal(other.to(dtype), want), f"data cannot catch {name}"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_linear_relu_rounds_once(backend, dtype):
    x, w, b = (grid(*shape, device=backend, gen=i).to(dtype)
               for i, shape in enumerate([(37, 24), (29, 24), (29,)]))
    exact = torch.relu(x.double() @ w.double().T + b.double())
    got = F.linear_relu(x, w, b)
    assert_once_rounded(got.cpu(), exact.cpu(), dtype,
                        [("truncation", truncated(exact.cpu(), dtype))])


@pytest.mark.parametrize("c", [1.0, 0.375])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fixed_hidden_rounds_once(backend, dtype, c):
    # sums of up to ~2**14, multiples of 2**-6 (exact in fp32), where 16-bit values are
    # more than 1 apart: x @ w + c falls between them
    x, w = (grid(*shape, lo=-300, hi=301, device=backend, gen=i).to(dtype)
            for i, shape in enumerate([(41, 20), (20, 23)]))
    exact = torch.relu(x.double() @ w.double() + c)
    twice = torch.relu((x.double() @ w.double()).to(dtype).double() + c)  # mm, then + c
    got = F.fixed_hidden(x, w, c)
    assert_once_rounded(got.cpu(), exact.cpu(), dtype,
                        [("two roundings", twice.cpu()),
                         ("truncation", truncated(exact.cpu(), dtype))])


@pytest.mark.parametrize("dim", [None, -1])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_centered_rounds_once(backend, dtype, dim):
    # 32 columns, 16 rows: every mean is exact; |x - mean| needs more bits than bf16 holds
    x16 = grid(16, 32, lo=-3000, hi=3001, step=1 / 16, device=backend).to(dtype)
    exact = x16.double() - (x16.double().mean() if dim is None
                            else x16.double().mean(dim, keepdim=True))
    got = F.centered(x16, dim)
    assert_once_rounded(got.cpu(), exact.cpu(), dtype,
                        [("truncation", truncated(exact.cpu(), dtype))])


if HAS_TRITON:  # (module level: Triton resolves a kernel's names among its globals)
    import triton
    import triton.language as tl
    from fastlayers.kernels.runtime import to_dtype

    @triton.jit
    def _convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = o < n
        v = tl.load(x_ptr + o, mask=ok, other=0.0)
        tl.store(y_ptr + o, to_dtype(v, y_ptr.dtype.element_ty), mask=ok)


@requires_triton
def test_kernel_conversion_rounds_to_nearest_even():
    """kernels.runtime.to_dtype (every fp32 -> 16-bit store of the GEMM and centering
    kernels) against torch's conversion, bit for bit: ties both ways, overflow to inf,
    subnormals, signed zeros, inf and NaN, and random bit patterns."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (4000,), generator=g, dtype=torch.int64)
    special = [0x3F808000, 0x3F818000, 0x3F80_8001, 0x7F7FFFFF, 0x7F7F8000, 0x00000001,
               0x00008000, 0x00018000, 0x0000C000, 0x007FFFFF, 0x80000000, 0x7F800000,
               0xFF800000, 0x7FC00000, 0x38000000, 0x387FF000, 0x33800000, 0x477FF000]
    bits = torch.cat([bits, torch.tensor(special), torch.tensor(special) | (1 << 31)])
    x = bits.to(torch.int32).view(torch.float32)  # (wraps the int64 values to 32 bits)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = x.to(device)
    for dtype in LOW:
        y = torch.empty(x.shape, dtype=dtype, device=device)
        _convert[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        want = x.to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(y), nan)
        differ = (y.view(torch.int16) != want.view(torch.int16)) & ~nan
        assert not differ.any(), (x[differ][:5], y[differ][:5], want[differ][:5])


# ------------------------------------------------------------------ sparse and nested
def _nested(*rows, width=5):
    return torch.nested.nested_tensor([torch.randn(r, width) for r in rows],
                                      layout=torch.jagged)


def test_sparse_and_nested_inputs_take_torchs_ops(backend):
    """The kernels take dense tensors only: a sparse or nested input gives what plain torch
    gives for it, on both paths (a layout torch refuses is refused with torch's error)."""
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    r = torch.rand(5, 5)
    torch.testing.assert_close(F.fixed_hidden_mlp(x, r, None, r.to_sparse()),  # any operand
                               F.fixed_hidden_mlp(x, r, None, r), rtol=1e-5, atol=1e-6)
    for sx in (x.to_sparse(), x.to_sparse_csr()):
        assert torch.equal(F.linear_relu(sx, w, b), torch.relu(torchF.linear(sx, w, b)))
        assert torch.equal(F.fixed_hidden(sx, w.T.contiguous()),
                           torch.relu(torch.matmul(sx, w.T.contiguous()) + 1))
    wt = w.T.contiguous()
    assert torch.equal(F.fixed_hidden(x, wt.to_sparse(), 0.5), torch.relu(x @ wt + 0.5))
    with pytest.raises(RuntimeError) as theirs:
        torchF.linear(x, w.to_sparse(), b)
    with pytest.raises(type(theirs.value)):
        F.linear_relu(x, w.to_sparse(), b)
    nx = _nested(2, 3)
    got = fastlayers.LinearReLU(5, 3)(nx)
    assert got.is_nested and [t.shape for t in got.unbind()] == [(2, 3), (3, 3)]
    got = F.centered(nx, -1)
    for g, t in zip(got.unbind(), nx.unbind()):
        assert torch.allclose(g, t - t.mean(-1, keepdim=True))


def test_negative_bit_inputs_give_the_values_they_hold(backend):
    """A negative-bit view (``z.conj().imag``; a contiguous one from ``torch._neg_view``)
    holds -x in memory: every op must read x, as torch's ops do, on both paths."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.complex64).conj().imag.to(backend)
    w, b, r = torch.randn(3, 8), torch.randn(3), torch.rand(8, 4)
    ws, bs, rs = torch.randn(8, 8) * 0.3, torch.randn(8), torch.rand(8, 8)
    w, b, r, ws, bs, rs = (t.to(backend) for t in (w, b, r, ws, bs, rs))
    flat = torch._neg_view(torch.randn(64).to(backend) * 3)
    assert x.is_neg() and flat.is_neg() and flat.is_contiguous()
    xr, fr = x.resolve_neg(), flat.resolve_neg()
    checks = [
        (F.linear_relu(x, w, b), F.linear_relu(xr, w, b)),
        (F.linear_relu(xr, torch._neg_view(w), b), F.linear_relu(xr, -w, b)),
        (F.centered(x), F.centered(xr)), (F.centered(x, -1), F.centered(xr, -1)),
        (F.centered(flat), F.centered(fr)),
        (F.fixed_hidden(x, r), F.fixed_hidden(xr, r)),
        (F.fixed_hidden(xr, torch._neg_view(r)), F.fixed_hidden(xr, -r)),
        (F.fixed_hidden_mlp(x, ws, bs, rs), F.fixed_hidden_mlp(xr, ws, bs, rs)),
        (F.fixed_hidden_mlp(xr, torch._neg_view(ws), torch._neg_view(bs), torch._neg_view(rs)),
         F.fixed_hidden_mlp(xr, -ws, -bs, -rs)),
        (F.halve_until(flat, 1.0), F.halve_until(fr, 1.0)),
        (torch.func.vmap(F.halve_until)(flat.view(8, 8)),  # the tensor-ops route
         torch.func.vmap(F.halve_until)(fr.view(8, 8))),
    ]
    for i, (got, want) in enumerate(checks):  # a path of its own may round differently
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"check {i}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fixed_hidden_under_autocast_rounds_once_too(backend, dtype):
    """Under autocast the inputs are cast to its dtype, then the op runs as on inputs of
    that dtype: one rounding (autocast must not cast the fp32 product back)."""
    x, w = (grid(*shape, lo=-300, hi=301, device=backend, gen=i).to(dtype)
            for i, shape in enumerate([(41, 20), (20, 23)]))
    with torch.autocast(torch.device(backend).type, dtype=dtype):
        got = F.fixed_hidden(x.float(), w.float(), 1.0)
    assert_once_rounded(got.cpu(), torch.relu(x.double() @ w.double() + 1.0).cpu(), dtype)
