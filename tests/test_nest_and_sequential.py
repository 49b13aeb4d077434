"""NestMLP and MySequential as the seed's with fused layers inside, and the seed's chain
``nn.Sequential(NestMLP(), nn.Linear(16, 20), FixedHiddenMLP())`` eager and under
torch.compile(fullgraph=True), forward and backward."""
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastlayers
from fastlayers.tour.seed import FixedHiddenMLPEager as SeedFixedHiddenMLP
from fastlayers.tour.seed import MySequential as SeedMySequential
from fastlayers.tour.seed import NestMLPEager as SeedNestMLP

from _util import assert_close_to_ref, randn

# the interpreter's numpy warns on fp32 overflow to inf inside the halving reduction
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ------------------------------------------------------------------ NestMLP, MySequential
def test_nest_mlp_is_the_seeds_with_fused_layers():
    torch.manual_seed(4)
    seed = SeedNestMLP()
    torch.manual_seed(4)
    ours = fastlayers.NestMLP()
    assert list(ours.state_dict()) == list(seed.state_dict())
    for key, value in seed.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert isinstance(ours.net[0], fastlayers.LinearReLU)
    seed.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(7, 20)
    with fastlayers.use_backend("torch"):
        assert torch.equal(ours(x), seed(x))


def test_nest_mlp_through_kernels(backend):
    ours = fastlayers.NestMLP().to(backend)
    x = randn(5, 20, device=backend).requires_grad_(True)
    y = ours(x)
    w = {k: v.double() for k, v in ours.state_dict().items()}
    h = torch.relu(TF.linear(x.double(), w["net.0.weight"], w["net.0.bias"]))
    h = torch.relu(TF.linear(h, w["net.2.weight"], w["net.2.bias"]))
    assert_close_to_ref(y, TF.linear(h, w["linear.weight"], w["linear.bias"]))
    y.sum().backward()
    assert x.grad is not None and ours.net[0].weight.grad is not None


def test_my_sequential_container():
    a, b, c = nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)
    seq = fastlayers.MySequential(a, b, c)
    seed = SeedMySequential(a, b, c)
    assert list(seq._modules) == ["0", "1", "2"] and len(seq) == 3
    assert list(seq) == [a, b, c] and seq[0] is a and seq[-1] is c
    assert isinstance(seq[1:], fastlayers.MySequential) and list(seq[1:]) == [b, c]
    # a slice keeps its children's keys, as nn.Sequential's does (its state_dict loads there)
    plain = nn.Sequential(a, b, c)
    for part in (slice(1, None), slice(2, 3), slice(None, None, -1), slice(0, 3, 2)):
        assert list(seq[part].state_dict()) == list(plain[part].state_dict())
        assert list(seq[part]._modules) == list(plain[part]._modules)
    assert torch.equal(seq[2:](torch.randn(4, 8)).detach() * 0, torch.zeros(4, 3))
    assert list(seq.state_dict()) == list(seed.state_dict()) == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(4, 20)
    assert torch.equal(seq(x), seed(x))
    with pytest.raises(IndexError, match="out of range"):
        seq[3]
    with pytest.raises(TypeError, match="argument 1"):
        fastlayers.MySequential(a, "relu")
    assert len(fastlayers.MySequential()) == 0


# ------------------------------------------------------------------ the seed's chain
def _chains():
    torch.manual_seed(0)
    seed = nn.Sequential(SeedNestMLP(), nn.Linear(16, 20), SeedFixedHiddenMLP(reduce="sum"))
    ours = nn.Sequential(fastlayers.NestMLP(), nn.Linear(16, 20),
                         fastlayers.FixedHiddenMLP(reduce="sum"))
    ours.load_state_dict(seed.state_dict(), strict=True)
    ours[2].rand_weight.copy_(seed[2].rand_weight)
    return seed, ours


def test_chain_eager_and_compiled_equal_the_seed(backend):
    torch._dynamo.reset()
    seed, ours = _chains()
    ours = ours.to(backend)
    x = randn(2, 20, device=backend)
    with torch.no_grad():
        expected = seed(x.cpu())
        eager = ours(x)
        compiled = torch.compile(ours, fullgraph=True)(x)
    assert eager.shape == compiled.shape == ()
    if fastlayers.get_backend() == "torch":  # the seed's own ops: bit for bit
        assert torch.equal(eager.cpu(), expected)
    torch.testing.assert_close(eager.cpu(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-8)


def test_chain_backward_under_compile_matches_eager(backend):
    torch._dynamo.reset()
    _, ours = _chains()
    ours = ours.to(backend)
    x = randn(6, 20, device=backend).requires_grad_(True)
    ours(x).backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    x.grad = None
    ours.zero_grad()
    torch.compile(ours, fullgraph=True)(x).backward()
    compiled = [x.grad] + [p.grad for p in ours.parameters()]
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-7)


def test_my_sequential_chain_compiles(backend):
    torch._dynamo.reset()
    chain = fastlayers.MySequential(fastlayers.NestMLP(), nn.Linear(16, 20),
                                    fastlayers.FixedHiddenMLP()).to(backend)
    x = randn(3, 20, device=backend)
    torch.testing.assert_close(torch.compile(chain, fullgraph=True)(x), chain(x))
