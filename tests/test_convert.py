"""fastlayers.fuse / unfuse: which pairs are rewritten (and which are not), equal outputs and
gradients, strict state_dict moves both ways, ties, lazy layers, in-place and copy."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.tour import seed
from fastlayers.convert import SkippedFusionWarning, is_chain

from _util import assert_close_to_ref


def _types(model):
    return [type(m).__name__ for m in model.modules()]


def _check_equivalent(plain, fused, x, backend_device="cpu"):
    """Same outputs and parameter gradients (bitwise on the torch path, fp32 accuracy on the
    Triton path), and state_dicts that load strictly both ways."""
    plain, fused = plain.to(backend_device), fused.to(backend_device)
    x = x.to(backend_device)
    y_plain, y_fused = plain(x), fused(x)
    exact = not fastlayers._backend.use_triton(x)
    if exact:
        assert torch.equal(y_fused, y_plain)
    else:
        assert_close_to_ref(y_fused, y_plain.double(), tol=1e-5)
    gy = torch.randn_like(y_plain)
    grads_plain = torch.autograd.grad(y_plain, list(plain.parameters()), gy)
    grads_fused = torch.autograd.grad(y_fused, list(fused.parameters()), gy)
    for gp, gf in zip(grads_plain, grads_fused):
        assert torch.equal(gf, gp) if exact else torch.allclose(gf, gp, rtol=1e-4, atol=1e-5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)


SEED_NETS = {
    "sequential": lambda: nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)),
    "rgnet": seed.rgnet,
    "nest": lambda: nn.Sequential(seed.NestMLP(), nn.Linear(16, 5), nn.ReLU()),
    "my_sequential": lambda: seed.MySequential(nn.Linear(20, 33), nn.ReLU(inplace=True),
                                                nn.Linear(33, 10), nn.ReLU()),
    "no_bias": lambda: nn.Sequential(nn.Linear(20, 7, bias=False), nn.ReLU()),
}
IN_FEATURES = {"rgnet": 4}


@pytest.mark.parametrize("name", list(SEED_NETS))
def test_fused_seed_nets_match_the_originals(backend, name):
    plain = SEED_NETS[name]()
    x = torch.randn(3, IN_FEATURES.get(name, 20))
    if name == "nest":
        plain(x)  # materialise the seed's lazy layers
    fused = fastlayers.fuse(plain)
    assert "LinearReLU" in _types(fused) and "LinearReLU" not in _types(plain)
    assert _types(fastlayers.unfuse(fused)) == _types(plain)
    _check_equivalent(plain, fused, x, backend)


def test_rewrite_keeps_indices_ties_and_parameter_objects():
    net = seed.tied_net()
    net(torch.rand(2, 4))
    fused = fastlayers.fuse(net, inplace=True)
    assert fused is net
    assert [type(m).__name__ for m in net] == ["LinearReLU", "Identity", "LinearReLU", "Identity",
                                               "LinearReLU", "Identity", "Linear"]
    assert net[2] is net[4] and net[2].weight is net[4].weight
    with torch.no_grad():
        net[2].weight[0, 0] = 100  # the seed's tie check
    assert net[2].weight.data[0, 0] == net[4].weight.data[0, 0] == 100

    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = list(plain.parameters())
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    fastlayers.fuse(plain, inplace=True)
    assert all(a is b for a, b in zip(params, plain.parameters()))  # the optimiser still works
    plain(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert all(p.grad is not None for p in params)


def test_copy_by_default_leaves_the_original_alone():
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    fused = fastlayers.fuse(plain)
    assert type(plain[0]) is nn.Linear and type(plain[1]) is nn.ReLU
    assert fused[0].weight is not plain[0].weight and torch.equal(fused[0].weight, plain[0].weight)


def test_lazy_layers_fuse_and_draw_the_same_init():
    plain = nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))
    fused = fastlayers.fuse(plain)
    assert isinstance(fused[0], fastlayers.LazyLinearReLU) and "in_features=0" in repr(fused[0])
    X = torch.rand(2, 20)
    torch.manual_seed(5)
    y_plain = plain(X)
    torch.manual_seed(5)
    y_fused = fused(X)
    assert torch.equal(y_fused, y_plain) and type(fused[0]) is fastlayers.LinearReLU
    assert "in_features=20" in repr(fused[0])
    back = fastlayers.unfuse(fastlayers.fuse(nn.Sequential(nn.LazyLinear(4), nn.ReLU())))
    assert type(back[0]) is nn.LazyLinear and type(back[1]) is nn.ReLU


def test_training_flag_dtype_and_device_survive():
    plain = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.ReLU()).eval()
    fused = fastlayers.fuse(plain)
    assert not fused[0].training and not fused[1].training
    assert fused[0].weight.dtype == torch.float64
    meta = fastlayers.fuse(nn.Sequential(nn.Linear(3, 4, device="meta"), nn.ReLU()))
    assert meta[0].weight.device.type == "meta"
    assert fastlayers.unfuse(fused)[0].weight.dtype == torch.float64


class LinearSub(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ReLUSub(nn.ReLU):
    def forward(self, x):
        return super().forward(x) - 1


class SequentialSub(nn.Sequential):
    def forward(self, x):  # uses the Linear's output twice
        return self[0](x) + self[1](self[0](x))


def test_what_is_not_rewritten():
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 3)
    shared_lazy = nn.LazyLinear(3)
    cases = {
        "linear subclass": nn.Sequential(LinearSub(3, 3), nn.ReLU()),
        "relu subclass": nn.Sequential(nn.Linear(3, 3), ReLUSub()),
        "hooked linear": nn.Sequential(hooked, nn.ReLU()),
        "other activation": nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU()),
        "relu first": nn.Sequential(nn.ReLU(), nn.Linear(3, 3)),
        "custom forward": nn.Sequential(SequentialSub(nn.Linear(3, 3), nn.ReLU())),
        "seed MLP": seed.MLP(),
        "module list": nn.ModuleList([nn.Linear(3, 3), nn.ReLU()]),
        "shared lazy": nn.Sequential(nn.Sequential(shared_lazy, nn.ReLU()), shared_lazy),
        "weight norm": nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
                                     nn.ReLU()),
    }
    for name, model in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _types(fastlayers.fuse(model)) == _types(model), name
        # only a pair left alone for its hooks is reported; the others are not pairs to fuse
        assert [type(w.message) for w in caught] == \
            ([SkippedFusionWarning] if name == "hooked linear" else []), name
    x = torch.randn(2, 3)
    model = cases["hooked linear"]
    with pytest.warns(SkippedFusionWarning):
        assert torch.equal(fastlayers.fuse(model)(x), model(x))
    # LinearReLU without a following Identity stays (splitting it would shift indices)
    own = nn.Sequential(fastlayers.LinearReLU(3, 3), fastlayers.LinearReLU(3, 2))
    assert _types(fastlayers.unfuse(own)) == _types(own)


def test_chain_recognition():
    assert is_chain(nn.Sequential()) and is_chain(seed.MySequential())
    assert not is_chain(SequentialSub()) and not is_chain(seed.NestMLP())

    class RenamedSeedCopy(nn.Module):  # the seed's MySequential, other variable names
        def __init__(self, *args):
            super().__init__()
            for i, m in enumerate(args):
                self._modules[str(i)] = m

        def forward(self, inputs):
            for block in self._modules.values():
                inputs = block(inputs)
            return inputs

    class NotQuite(RenamedSeedCopy):
        def forward(self, inputs):
            for block in self._modules.values():
                inputs = block(inputs) + 0
            return inputs

    assert is_chain(RenamedSeedCopy())
    assert not is_chain(NotQuite())
    fused = fastlayers.fuse(RenamedSeedCopy(nn.Linear(3, 3), nn.ReLU()))
    assert type(fused._modules["0"]) is fastlayers.LinearReLU
    assert is_chain(fastlayers.MySequential())  # fastlayers' own
    fused = fastlayers.fuse(fastlayers.MySequential(nn.Linear(3, 3), nn.ReLU()))
    assert type(fused[0]) is fastlayers.LinearReLU and type(fused[1]) is nn.Identity


def test_fastlayers_blocks(backend):
    """NestMLP is fused already: unfuse gives the seed's layers with the same output; the
    Linear that FixedHiddenMLP uses twice is never fused."""
    nest = fastlayers.NestMLP()
    plain = fastlayers.unfuse(nest)
    assert [type(m).__name__ for m in plain.net] == ["Linear", "ReLU", "Linear", "ReLU"]
    _check_equivalent(plain, nest, torch.randn(4, 20), backend)
    chimera = nn.Sequential(fastlayers.NestMLP(), nn.Linear(16, 20), nn.ReLU(),
                            fastlayers.FixedHiddenMLP(reduce="sum"))
    fused = fastlayers.fuse(chimera)
    assert type(fused[1]) is fastlayers.LinearReLU and type(fused[3].linear) is nn.Linear
    x = torch.randn(3, 20)
    chimera, fused, x = chimera.to(backend), fused.to(backend), x.to(backend)
    assert torch.allclose(fused(x), chimera(x), rtol=1e-5, atol=0)


def test_errors():
    with pytest.raises(TypeError, match="expected an nn.Module, got Tensor"):
        fastlayers.fuse(torch.ones(1))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fastlayers.unfuse([nn.Linear(2, 2)])


def test_deepcopy_of_a_fused_model_keeps_sharing():
    net = seed.tied_net()
    net(torch.rand(2, 4))
    clone = copy.deepcopy(fastlayers.fuse(net))
    assert clone[2] is clone[4]


# ---------------------------------------------------------------- TorchScript submodules
@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_scripted_and_traced_submodules_are_left_alone_and_the_rest_fused(backend):
    scripted = torch.jit.script(nn.Sequential(nn.Linear(7, 5), nn.ReLU()))
    traced = torch.jit.trace(nn.Sequential(nn.Linear(5, 3), nn.ReLU()), torch.randn(2, 5))
    plain = nn.Sequential(scripted, nn.Linear(5, 5), nn.ReLU(inplace=True), traced,
                          nn.Linear(3, 2), nn.ReLU())
    fused = fastlayers.fuse(plain)
    assert [type(m).__name__ for m in fused][1:3] == ["LinearReLU", "Identity"]
    assert [type(m).__name__ for m in fused][4:] == ["LinearReLU", "Identity"]
    assert all(isinstance(fused[i], torch.jit.ScriptModule) for i in (0, 3))
    assert not any(isinstance(m, fastlayers.LinearReLU) for m in fused[0].modules())
    _check_equivalent(plain, fused, torch.randn(11, 7), backend)
    back = fastlayers.unfuse(fused)
    assert [type(m).__name__ for m in back][1:3] == ["Linear", "ReLU"] and back[2].inplace
    # a scripted model itself: nothing to rewrite, no error, in place or not
    assert not is_chain(scripted)
    assert fastlayers.fuse(scripted, inplace=True) is scripted
    assert isinstance(fastlayers.fuse(scripted), torch.jit.ScriptModule)
    assert isinstance(fastlayers.unfuse(traced), torch.jit.ScriptModule)


# ---------------------------------------------------------------- unfuse restores the ReLU
def test_unfuse_restores_the_relu_as_it_was(backend):
    relu = nn.ReLU(inplace=True)
    relu.note = "first activation"  # any other state a user put there
    shared = nn.ReLU()
    plain = nn.Sequential(nn.Linear(6, 5), relu, nn.Linear(5, 5), shared,
                          nn.Linear(5, 3), shared).eval()
    fused = fastlayers.fuse(plain)
    assert "ReLU" not in _types(fused)  # the kept ReLUs are no submodules ...
    assert list(fused.state_dict()) == list(plain.state_dict())  # ... and no state
    back = fastlayers.unfuse(fused)
    assert _types(back) == _types(plain)
    assert back[1].inplace is True and back[1].note == "first activation"
    assert back[3] is back[5] and back[3].inplace is False  # a shared ReLU stays shared
    assert not back[1].training and not back[3].training
    back = fastlayers.unfuse(copy.deepcopy(fused).train())  # copies keep it; the flag follows
    assert back[1].inplace is True and back[1].training
    _check_equivalent(plain, back, torch.randn(4, 6), backend)

    model = nn.Sequential(nn.Linear(6, 5), relu)  # in place: the very same object comes back
    fastlayers.unfuse(fastlayers.fuse(model, inplace=True), inplace=True)
    assert model[1] is relu and relu.inplace
    # an Identity fuse() did not make becomes a default nn.ReLU()
    own = fastlayers.unfuse(nn.Sequential(fastlayers.LinearReLU(6, 5), nn.Identity()))
    assert type(own[1]) is nn.ReLU and own[1].inplace is False


def test_a_fused_slot_returns_post_relu_values(backend):
    """What the README warns about: net[0] of a fused net is Linear+ReLU, not the Linear."""
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(backend)
    fused = fastlayers.fuse(plain)
    x = torch.randn(13, 5, device=backend)
    pre = plain[0](x)
    assert (pre < 0).any()
    want = torch.relu(x.double() @ plain[0].weight.double().T + plain[0].bias.double())
    assert_close_to_ref(fused[0](x), want, tol=1e-6)
    assert_close_to_ref(fused[:1](x), want, tol=1e-6)
    assert_close_to_ref(fastlayers.unfuse(fused)[0](x), pre.double(), tol=1e-6)  # the way back
    with warnings.catch_warnings():  # a clean model fuses without a word
        warnings.simplefilter("error")
        fastlayers.fuse(plain)

