"""FlopCounterMode counts fastlayers models as it counts the unfused plain-torch models,
forward and backward, on both paths (the formulas live in fastlayers/flops.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastlayers
from fastlayers.tour import seed as _seed


def _count(fn, backward=True):
    """(total FLOPs, {op name: FLOPs}) of fn() and, with backward, of .sum().backward()."""
    mode = FlopCounterMode(display=False)
    with mode:
        out = fn()
        if backward:
            out.sum().backward()
    per_op = {str(op): n for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return mode.get_total_flops(), per_op


def _input(*shape, requires_grad=True):
    return torch.randn(*shape).requires_grad_(requires_grad)


@pytest.mark.parametrize("shape, requires_grad", [((16, 64), True), ((16, 64), False),
                                                  ((2, 3, 64), True), ((1, 64), True)])
def test_linear_relu_counts_like_linear_plus_relu(backend, shape, requires_grad):
    fused = fastlayers.LinearReLU(64, 32)
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    plain[0].load_state_dict(fused.state_dict())
    x = _input(*shape, requires_grad=requires_grad).to(backend)
    m = x[..., 0].numel()
    got, per_op = _count(lambda: fused.to(backend)(x))
    want, _ = _count(lambda: plain.to(backend)(x))
    assert got == want == 2 * m * 64 * 32 * (3 if requires_grad else 2)
    if fastlayers.get_backend() == "triton":  # the kernel path: counted as our op
        assert per_op["fastlayers.linear_relu_fwd"] == 2 * m * 64 * 32
    if shape == (16, 64) and requires_grad:
        assert got == 196608  # 16x64->32 forward + grad_x + grad_W


def test_forward_only_and_no_bias(backend):
    fused = fastlayers.LinearReLU(13, 7, bias=False).to(backend)
    x = torch.randn(5, 13, device=backend)
    got, _ = _count(lambda: fused(x), backward=False)
    want, _ = _count(lambda: F.relu(F.linear(x, fused.weight)), backward=False)
    assert got == want == 2 * 5 * 13 * 7


def test_mylinear_counts_like_matmul_plus_bias(backend):
    fused = fastlayers.MyLinear(11, 6).to(backend)
    x = _input(9, 11).to(backend)
    got, _ = _count(lambda: fused(x))
    want, _ = _count(lambda: F.relu(x @ fused.weight + fused.bias))
    assert got == want == 3 * 2 * 9 * 11 * 6


def test_fixed_hidden_counts_like_mm_plus_relu(backend):
    fused = fastlayers.FixedHiddenMatmul(10, 7).to(backend)
    x = _input(6, 10).to(backend)
    got, per_op = _count(lambda: fused(x))
    want, _ = _count(lambda: F.relu(torch.mm(x, fused.weight) + 1))
    assert got == want == 2 * 2 * 6 * 10 * 7  # forward + grad_x (the weight is frozen)
    if fastlayers.get_backend() == "triton":  # the kernel path: counted as our op
        assert per_op["fastlayers.fixed_hidden_bwd_input"] == 2 * 6 * 10 * 7


@pytest.mark.parametrize("reduce", [None, "sum"])
def test_fixed_hidden_mlp_counts_like_the_seed(backend, reduce):
    seed = _seed.FixedHiddenMLPEager(reduce)
    fused = fastlayers.FixedHiddenMLP.from_seed(seed, reduce=reduce)
    x = _input(3, 20)
    got, per_op = _count(lambda: fused.to(backend)(x.to(backend)))
    want, _ = _count(lambda: seed(x))
    assert got == want == (3 + 5) * 2 * 3 * 20 * 20
    if fastlayers.get_backend() == "triton":  # the kernel path: counted as our ops
        assert set(per_op) == {"fastlayers.fixed_hidden_mlp_fwd",
                               "fastlayers.fixed_hidden_mlp_bwd"}


def test_nest_mlp_counts_like_the_seed(backend):
    seed = _seed.NestMLPEager()
    fused = fastlayers.fuse(seed)
    x = _input(4, 20)
    got, _ = _count(lambda: fused.to(backend)(x.to(backend)))
    want, _ = _count(lambda: seed(x))
    assert got == want == 3 * 2 * 4 * (20 * 64 + 64 * 32 + 32 * 16)


def test_centered_counts_zero_like_torch(backend):
    x = _input(4, 5).to(backend)
    got, _ = _count(lambda: fastlayers.CenteredLayer()(x))
    want, _ = _count(lambda: x - x.mean())
    assert got == want == 0
