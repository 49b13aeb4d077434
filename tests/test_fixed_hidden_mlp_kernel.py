"""fixed_hidden_mlp's kernel path: a bias of any layout (issue 9 item 1: a stride-0
expanded bias, a ``[1::2]`` view, a column of a matrix) on both paths (the fused kernel for
d <= 64, the composed GEMMs above), and the one-launch forward at small batch (issue 10),
against the float64 torch composite and the loop's count."""
import pytest
import torch
import torch.nn.functional as TF

import fastlayers
from fastlayers import functional as F
from fastlayers.reference import halve_until_loop

from _util import REL_TOL, assert_close_to_ref, counted_launches, randn
from conftest import KERNEL_DEVICE, requires_triton


def bias_of_layout(d, layout, gen):
    if layout == "expanded":  # stride 0
        return torch.rand(1, generator=gen, dtype=torch.float64).expand(d) * 2 - 1
    if layout == "step2":  # stride 2, storage offset 1
        return (torch.rand(2 * d, generator=gen, dtype=torch.float64) * 2 - 1)[1::2]
    return (torch.rand(d, 3, generator=gen, dtype=torch.float64) * 2 - 1)[:, 1]  # stride 3


@pytest.mark.parametrize("d", [20, 70])
@pytest.mark.parametrize("layout", ["expanded", "step2", "column"])
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_bias_of_any_layout(backend, d, layout, reduce):
    gen = torch.Generator().manual_seed(d)
    w = (torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1) * d ** -0.5
    r = torch.rand(d, d, generator=gen, dtype=torch.float64)
    b = bias_of_layout(d, layout, gen)
    x = randn(7, d, dtype=torch.float64)
    y64 = TF.linear(torch.relu(TF.linear(x, w, b) @ r + 1.0), w, b)
    ref, k64 = halve_until_loop(y64)
    f32 = [t.to(device=backend, dtype=torch.float32) for t in (x, w, r)]
    b32 = b.to(dtype=torch.float32)
    b32 = {"expanded": b32[:1].clone().expand(d),  # a storage of one element
           "step2": b32.repeat_interleave(2)[1::2],
           "column": b32[:, None].repeat(1, 3)[:, 1]}[layout].to(backend)
    assert b32.stride(0) == {"expanded": 0, "step2": 2, "column": 3}[layout]
    out, k = F.fixed_hidden_mlp(f32[0], f32[1], b32, f32[2], reduce=reduce, return_count=True)
    assert int(k) == k64
    assert_close_to_ref(out, ref.sum() if reduce == "sum" else ref, torch.float32,
                        tol=None if reduce is None else 1e-4, what=f"{layout} d={d}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_small_batch_forward_is_one_launch(dtype, reduce):
    """Issue 10: when one program covers the batch (the seed's B=2), the forward is ONE
    Triton launch (matmuls, count and halving in registers) and nothing else runs; a batch
    one row past the block takes the multi-program plan. Both give the loop's count and
    values within rounding of the float64 composite."""
    from fastlayers.kernels import fixed_hidden_mlp as K
    d = 20
    block_m = K._fused_config(d)[1]
    gen = torch.Generator().manual_seed(7)
    w = ((torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1) * d ** -0.5)
    b = torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1
    r = torch.rand(d, d, generator=gen, dtype=torch.float64)
    for B, want in ((2, 1), (block_m, 1), (block_m + 1, None)):
        x = randn(B, d, dtype=torch.float64)
        y64 = TF.linear(torch.relu(TF.linear(x, w, b) @ r + 1.0), w, b)
        ref, k64 = halve_until_loop(y64)
        args = [t.to(device=KERNEL_DEVICE, dtype=dtype) for t in (x, w, b, r)]
        with torch.no_grad(), fastlayers.use_backend("triton"), counted_launches() as launches:
            out, k = F.fixed_hidden_mlp(*args, reduce=reduce, return_count=True)
        if want is not None:
            assert launches == ["_fixed_hidden_mlp_fwd_kernel"], f"B={B}: {launches}"
        else:  # partials from the fused kernel, then the count (and the scale) kernel
            scale = [] if reduce == "sum" and dtype != torch.float16 else ["_halve_scale_kernel"]
            assert launches == ["_fixed_hidden_mlp_fwd_kernel", "_halve_count_kernel"] + scale, \
                f"B={B}: {launches}"
        assert int(k) == k64, f"B={B}: count {int(k)} != the loop's {k64}"
        assert_close_to_ref(out, ref.sum() if reduce == "sum" else ref, dtype,
                            tol=None if reduce is None else 20 * REL_TOL[dtype], what=f"B={B}")


def _seed_sum(x, w, b, r, c, t):
    """The seed's block in plain torch, its loop, then ``X.sum()``: (out, k)."""
    with torch.no_grad():
        y = TF.linear(torch.relu(TF.linear(x, w, b) @ r + c), w, b)
        y, k = halve_until_loop(y, t)
        return y.sum(), k


ROUNDING_CASES = ["bf16-subnormal", "fp32-subnormal", "fp32-sum-overflow"]


def _rounding_case(case, device):
    """(x, w, b, r, c, threshold) as ``case`` names, 65 rows of integer-valued data times
    powers of two (every matmul and sum exact, so results are comparable bitwise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (65, 3), generator=g).double()
    w = torch.tensor([[1., -1., 0.], [0., 1., 1.], [-1., 0., 1.]], dtype=torch.float64)
    b = torch.tensor([1., -2., 0.], dtype=torch.float64)
    r = torch.tensor([[1., 0., 1.], [0., 1., 0.], [1., 1., 0.]], dtype=torch.float64)
    c, dtype = 1.0, torch.float32
    if case == "bf16-subnormal":
        dtype = torch.bfloat16
    elif case == "fp32-subnormal":
        x, c = x * torch.tensor([1.0, 2.0 ** -20, 1.0], dtype=torch.float64), 0.0
    else:
        x, w, b, c = x.abs() * 2.0 ** 120, w.abs(), b.abs() * 2.0 ** 120, 0.0
    t = 1.0 if case == "fp32-sum-overflow" else torch.finfo(dtype).tiny
    return (*[v.to(device=device, dtype=dtype) for v in (x, w, b, r)], c, t)


@pytest.mark.parametrize("case", ROUNDING_CASES)
def test_reduce_sum_when_elements_round_or_the_sum_overflows(backend, case):
    """reduce='sum' over several programs (65 rows) where the shortcut (sum y) * 2**-k is
    not the loop's: halved elements that round (subnormal results) and a |y| sum that
    overflows fp32 with finite elements. out and k are bitwise the seed's on both paths."""
    x, w, b, r, c, t = _rounding_case(case, backend)
    want, k_want = _seed_sum(x, w, b, r, c, t)
    out, k = F.fixed_hidden_mlp(x, w, b, r, c=c, threshold=t, reduce="sum", return_count=True)
    assert int(k) == k_want
    assert torch.equal(out, want), f"{out.item()!r} != the seed's {want.item()!r}"


@requires_triton
@pytest.mark.parametrize("case", ROUNDING_CASES)
def test_reduce_sum_composed_path_when_elements_round(case):
    """The same cases through the composed GEMMs (the d > 64 plan, forced here)."""
    from fastlayers.kernels import fixed_hidden_mlp as K
    from fastlayers.ops import halve_until as H
    x, w, b, r, c, t = _rounding_case(case, KERNEL_DEVICE)
    want, k_want = _seed_sum(x, w, b, r, c, t)
    t_in = H.threshold_in(x.dtype, t)
    window = H.window_below(x.numel(), x.dtype, t_in)
    with fastlayers.use_backend("triton"):
        out, k, _ = K.fixed_hidden_mlp_fwd(x, w, b, r, c, t_in, window, True, False,
                                           path="composed")
    assert int(k) == k_want
    assert torch.equal(out, want), f"{out.item()!r} != the seed's {want.item()!r}"
