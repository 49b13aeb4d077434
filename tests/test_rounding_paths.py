"""Every 16-bit output the kernels write is the exact value rounded once (to nearest even),
also on the paths test_rounding.py does not reach: gradients (the gated GEMM and its row
sums), split-K, both GEMM kernels, every centering path, the FixedHiddenMLP's
intermediates, and a c that 16 bits cannot hold."""
import pytest
import torch

from fastlayers import functional as F
from conftest import KERNEL_DEVICE, requires_triton
from test_rounding import LOW, assert_once_rounded, grid, truncated


def _all_once_rounded(gots, exacts, dtype):
    got = torch.cat([g.detach().cpu().reshape(-1) for g in gots])
    exact = torch.cat([e.detach().cpu().reshape(-1) for e in exacts])
    assert_once_rounded(got, exact, dtype, [("truncation", truncated(exact, dtype))])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_linear_relu_gradients_round_once(backend, dtype):
    x, w, b = (grid(*s, lo=-300, hi=301, device=backend, gen=i).to(dtype).requires_grad_()
               for i, s in enumerate([(37, 24), (29, 24), (29,)]))
    g = grid(37, 29, lo=-300, hi=301, device=backend, gen=7).to(dtype)
    y = F.linear_relu(x, w, b)
    y.backward(g)
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    gm = torch.where(torch.relu(x64 @ w64.T + b64) > 0, g.double(), 0.0)
    _all_once_rounded([x.grad, w.grad, b.grad], [gm @ w64, gm.T @ x64, gm.sum(0)], dtype)


@requires_triton
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_split_k_rounds_once(dtype, splits):
    from fastlayers.kernels.gemm import fused_gemm
    a = grid(35, 171, lo=-300, hi=301, device=KERNEL_DEVICE, gen=1).to(dtype)
    b = grid(171, 25, lo=-300, hi=301, device=KERNEL_DEVICE, gen=2).to(dtype)
    gate = grid(35, 171, device=KERNEL_DEVICE, gen=3).to(dtype)
    c, rs = fused_gemm(a, b, gate=gate, rowsum=True, split_k=splits, path="pointer")
    a64 = torch.where(gate.double() <= 0, 0.0, a.double())
    _all_once_rounded([c, rs], [a64 @ b.double(), a64.sum(1)], dtype)


@requires_triton
@pytest.mark.parametrize("case", [((4, 100), [1], "segments"), ((100, 3), [0], "segments"),
                                  ((1031,), [], "persistent"), ((1031,), [], "segments"),
                                  ((2, 129), [1], "split"), ((3, 37, 5), [1], "split")])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_every_centering_path_rounds_once(dtype, case):
    from fastlayers.kernels import centered as K
    shape, dims, path = case
    n = 1
    for s in shape:
        n *= s
    # multiples of 2**-4: every mean over a power-of-two count is exact; others are not,
    # so compare with the fp32 mean the documented numerics use (sum / C in fp32)
    x = grid(*shape, lo=-3000, hi=3001, step=1 / 16, device=KERNEL_DEVICE).to(dtype)
    x64 = x.double()
    s = x64.sum(dims, keepdim=True) if dims else x64.sum()
    cnt = n if not dims else shape[dims[0]]
    mean32 = (s.float() / cnt).double()  # sums are exact in fp32 here
    exact = x64 - mean32
    got = K.centered(x, dims, path)
    assert_once_rounded(got.cpu(), exact.cpu(), dtype,
                        [("truncation", truncated(exact.cpu(), dtype))])


@requires_triton
@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fixed_hidden_mlp_intermediates_round_once_each(dtype, path):
    """h1 = rnd(x W^T + b), h2 = rnd(relu(h1 R + c)), y = rnd(h2 W^T + b): each step's
    exact value rounded once (README numerics), checked on the saved h2 and on y."""
    from fastlayers.kernels import fixed_hidden_mlp as KM
    d, c = 20, 0.375
    x = grid(37, d, lo=-16, hi=17, step=1 / 4, device=KERNEL_DEVICE, gen=1).to(dtype)
    w = grid(d, d, lo=-8, hi=9, step=1 / 16, device=KERNEL_DEVICE, gen=2).to(dtype)
    b = grid(d, lo=-8, hi=9, step=1 / 8, device=KERNEL_DEVICE, gen=3).to(dtype)
    r = grid(d, d, lo=0, hi=9, step=1 / 8, device=KERNEL_DEVICE, gen=4).to(dtype)
    out, k, h2 = KM.fixed_hidden_mlp_fwd(x, w, b, r, c, 1e30, 10 ** 6, False, True, path=path)
    x64, w64, b64, r64 = (t.double() for t in (x, w, b, r))
    h1 = (x64 @ w64.T + b64).to(dtype).double()
    h2_exact = torch.relu(h1 @ r64 + c)
    assert_once_rounded(h2.cpu(), h2_exact.cpu(), dtype,
                        [("two roundings", (h1 @ r64).to(dtype).double().add(c).relu().cpu())])
    y_exact = h2_exact.to(dtype).double() @ w64.T + b64
    assert int(k) == 0
    assert_once_rounded(out.cpu(), y_exact.cpu(), dtype)


@pytest.mark.parametrize("c", [0.1, 1 / 3, -2.7])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fixed_hidden_adds_c_in_fp32(backend, dtype, c):
    """c is a Python float added in fp32 (README): a c that 16 bits cannot hold must not be
    rounded to x's dtype first. x @ w is exact in fp32 here; the sum with fp32(c) rounds in
    fp32, then once more to x's dtype, which is what the kernels do."""
    x, w = (grid(*shape, device=backend, gen=i).to(dtype)
            for i, shape in enumerate([(41, 20), (20, 23)]))
    xw = (x.double() @ w.double()).float().cpu()  # exact
    want = torch.relu(xw + torch.tensor(c, dtype=torch.float32)).double()
    got = F.fixed_hidden(x, w, c)
    c16 = float(torch.tensor(c, dtype=dtype))
    assert_once_rounded(got.cpu(), want, dtype,
                        [("c rounded to x's dtype", torch.relu(xw + c16).double())])


@requires_triton
@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_both_gemm_kernels_round_once(dtype, path):
    from fastlayers.kernels.gemm import fused_gemm
    a = grid(40, 48, lo=-300, hi=301, device=KERNEL_DEVICE, gen=1).to(dtype)
    b = grid(48, 32, lo=-300, hi=301, device=KERNEL_DEVICE, gen=2).to(dtype)
    bias = grid(32, lo=-300, hi=301, device=KERNEL_DEVICE, gen=3).to(dtype)
    gate = grid(40, 48, device=KERNEL_DEVICE, gen=4).to(dtype)
    c = fused_gemm(a, b, bias=bias, relu=True, path=path)
    g, rs = fused_gemm(a, b, gate=gate, rowsum=True, path=path)
    a64 = torch.where(gate.double() <= 0, 0.0, a.double())
    _all_once_rounded([c, g, rs], [torch.relu(a.double() @ b.double() + bias.double()),
                                   a64 @ b.double(), a64.sum(1)], dtype)
