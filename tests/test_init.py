"""fastlayers.init: bitwise equal to the seed's init functions on plain models, the same draws
on fused models, MyLinear's [in, out] layout, frozen buffers, bias policies, lazy layers.
These helpers delegate to torch and launch no fastlayers op, so one path suffices; the
layers' own outputs are checked on both paths in test_parity_modules.py."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.tour import seed as _seed
from fastlayers import init


def _plain_models():
    tied = _seed.tied_net()
    tied(torch.rand(2, 4))
    return {
        "sequential": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)),
        "rgnet": _seed.rgnet(),
        "tied": tied,
        "nest": nn.Sequential(_seed.NestMLP(), nn.Linear(16, 3)),
    }


def _materialise(model):
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        model(torch.rand(2, 20))
    return model


# (seed function applied with net.apply, the fastlayers call that must do the same)
SEED_EQUIVALENTS = {
    "init_normal": (_seed.init_normal, lambda net: init.normal_(net, mean=0, std=0.01)),
    "init_constant": (_seed.init_constant, lambda net: init.constant_(net, 1)),
    "init_xavier": (_seed.init_xavier, lambda net: init.xavier_uniform_(net, bias="keep")),
    "init_42": (_seed.init_42, lambda net: init.constant_(net, 42, bias="keep")),
    "my_init": (_seed.my_init, lambda net: init.apply(net, _my_init_body)),
}


def _my_init_body(module):
    """The seed's my_init without its ``type(module) == nn.Linear`` test (init.apply does it)."""
    nn.init.uniform_(module.weight, -10, 10)
    module.weight.data *= module.weight.data.abs() >= 5


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("model", list(_plain_models()))
@pytest.mark.parametrize("seed_fn", list(SEED_EQUIVALENTS))
@pytest.mark.parametrize("fused", [False, True])
def test_bitwise_equal_to_the_seed(model, seed_fn, fused):
    """Same global seed -> the same random draws, on the plain model and on its fused copy."""
    reference = _materialise(_plain_models()[model])
    ours = copy.deepcopy(reference)
    if fused:
        ours = fastlayers.fuse(ours)
        if model != "nest":  # nest's chain sits inside NestMLP: fused one level down
            assert any(isinstance(m, fastlayers.LinearReLU) for m in ours.modules())
    seed_apply, call = SEED_EQUIVALENTS[seed_fn]
    torch.manual_seed(123)
    reference.apply(seed_apply)
    torch.manual_seed(123)
    returned = call(ours)
    assert returned is ours
    _assert_same_state(ours, reference)


def test_tied_layer_stays_tied():
    net = _materialise(_plain_models()["tied"])
    fused = fastlayers.fuse(net)
    init.normal_(fused, std=0.5, bias=0.25)
    assert fused[2].weight is fused[4].weight
    assert torch.equal(fused[2].bias, torch.full((8,), 0.25))


def _reference_init(model, fill, bias):
    """What each function must do, layer by layer, written with plain torch.nn.init."""
    for m in _apply_order(model):
        if isinstance(m, fastlayers.MyLinear):
            tmp = torch.empty(m.weight.shape[::-1])
            fill(tmp)
            with torch.no_grad():
                m.weight.copy_(tmp.t())
        elif isinstance(m, (nn.Linear, fastlayers.LinearReLU)):
            fill(m.weight)
        else:
            continue
        if m.bias is not None and bias != "keep":
            nn.init.constant_(m.bias, 0.0 if bias == "zero" else bias)


def _apply_order(model):
    order = []
    model.apply(order.append)
    return order


def _mixed_model():
    lazy = fastlayers.LazyLinearReLU(7)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), fastlayers.LinearReLU(6, 9),
                        nn.Identity(), fastlayers.MyLinear(9, 4), lazy, nn.Linear(7, 3, bias=False))
    net(torch.rand(2, 5))  # materialises the lazy layer
    return net


FUNCTIONS = {
    "normal_": (dict(mean=0.5, std=2.0), lambda t: nn.init.normal_(t, 0.5, 2.0)),
    "uniform_": (dict(a=-3.0, b=-1.0), lambda t: nn.init.uniform_(t, -3.0, -1.0)),
    "constant_": (dict(val=0.75), lambda t: nn.init.constant_(t, 0.75)),
    "zeros_": ({}, nn.init.zeros_),
    "ones_": ({}, nn.init.ones_),
    "xavier_uniform_": (dict(gain=1.5), lambda t: nn.init.xavier_uniform_(t, 1.5)),
    "xavier_normal_": (dict(gain=0.5), lambda t: nn.init.xavier_normal_(t, 0.5)),
    "kaiming_uniform_": (dict(a=0.1, mode="fan_out", nonlinearity="leaky_relu"),
                         lambda t: nn.init.kaiming_uniform_(t, 0.1, "fan_out", "leaky_relu")),
    "kaiming_normal_": (dict(nonlinearity="relu"),
                        lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu")),
    "orthogonal_": (dict(gain=2.0), lambda t: nn.init.orthogonal_(t, 2.0)),
    "sparse_": (dict(sparsity=0.5, std=0.1), lambda t: nn.init.sparse_(t, 0.5, 0.1)),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bias", ["zero", "keep", -1.5])
def test_every_function_on_every_linear_like_layer(name, bias):
    kwargs, fill = FUNCTIONS[name]
    ours = _mixed_model()
    ref = copy.deepcopy(ours)
    before = copy.deepcopy(ours)
    torch.manual_seed(7)
    assert getattr(init, name)(ours, **kwargs, bias=bias) is ours
    torch.manual_seed(7)
    _reference_init(ref, fill, bias)
    _assert_same_state(ours, ref)
    for key, value in ours.state_dict().items():  # every weight changed (or was set to 0/1/c)
        if key.endswith("weight") and name not in ("zeros_", "ones_", "constant_"):
            assert not torch.equal(value, before.state_dict()[key]), key
        if key.endswith("bias"):
            assert torch.equal(value, before.state_dict()[key]) == (bias == "keep"), key


def test_mylinear_fan_in_is_in_units():
    """MyLinear(in, out) gets nn.Linear(in, out)'s init, transposed: fan_in = in_units."""
    my, lin = fastlayers.MyLinear(300, 20), nn.Linear(300, 20)
    for fn in (init.kaiming_uniform_, init.xavier_normal_, init.orthogonal_):
        torch.manual_seed(3)
        fn(my)
        torch.manual_seed(3)
        fn(lin)
        assert torch.equal(my.weight, lin.weight.t())
    torch.manual_seed(3)
    init.kaiming_uniform_(my, nonlinearity="relu")
    bound = (2.0 ** 0.5) * (3.0 / 300) ** 0.5  # gain(relu) * sqrt(3 / fan_in), fan_in = 300
    assert my.weight.abs().max() <= bound and my.weight.abs().max() > 0.9 * bound
    init.orthogonal_(my)
    eye = my.weight.t() @ my.weight  # [20, 300] rows orthonormal <=> W^T W = I (20x20)
    assert torch.allclose(eye, torch.eye(20), atol=1e-5)


class FrozenBlock(nn.Module):
    """A fixed weight buffer named ``weight`` next to a trainable Linear."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.rand(4, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x @ self.weight)


def test_frozen_buffers_are_never_touched():
    model = nn.Sequential(FrozenBlock(), nn.ReLU(), FrozenBlock(),
                          fastlayers.FixedHiddenMatmul(4, 20), fastlayers.FixedHiddenMLP(),
                          fastlayers.NestMLP())
    buffers = [b.clone() for b in model.buffers()]
    init.constant_(model, 3.0)
    init.normal_(model)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    torch.manual_seed(0)
    init.constant_(model, 3.0)
    assert all((m.linear.weight == 3).all() for m in (model[0], model[2], model[4], model[5]))
    assert (model[5].net[2].weight == 3).all() and (model[4].linear.bias == 0).all()


def test_frozen_parameters_are_initialised_and_stay_leaves():
    layer = fastlayers.LinearReLU(3, 2)
    layer.weight.requires_grad_(False)
    init.ones_(layer, bias=2.0)
    assert torch.equal(layer.weight, torch.ones(2, 3)) and not layer.weight.requires_grad
    assert layer.bias.is_leaf and layer.bias.requires_grad
    layer(torch.rand(1, 3)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.ones(2))


def test_uninitialised_lazy_layers_are_skipped_with_a_warning():
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2), fastlayers.LazyLinearReLU(3))
    with pytest.warns(UserWarning, match=r"skipped 2 uninitialised lazy layer\(s\) \(0, 3\).*forward"):
        init.constant_(net, 5.0)
    assert (net[2].weight == 5).all() and (net[2].bias == 0).all()
    net(torch.rand(2, 6))  # materialise: now they are initialised
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init.constant_(net, 5.0)
    assert (net[0].weight == 5).all() and (net[3].weight == 5).all()


def test_bad_arguments_change_nothing():
    net = nn.Sequential(nn.Linear(2, 2))
    before = copy.deepcopy(net.state_dict())
    for bad in ("zeros", None, True, [0.0]):
        with pytest.raises(ValueError, match="bias must be 'zero', 'keep' or a number"):
            init.normal_(net, bias=bad)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(TypeError, match="expected an nn.Module, got Tensor"):
        init.zeros_(torch.ones(2, 2))


def test_generator_is_used_instead_of_the_global_rng():
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    init.xavier_uniform_(a, generator=torch.Generator().manual_seed(11))
    state = torch.get_rng_state()
    init.xavier_uniform_(b, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight)


def test_apply_visits_only_linear_like_layers_in_apply_order():
    net = _mixed_model()
    seen = []
    assert init.apply(net, seen.append) is net
    assert seen == [m for m in _apply_order(net) if init.is_linear_like(m)]
    assert [type(m).__name__ for m in seen] == ["Linear", "LinearReLU", "MyLinear", "LinearReLU",
                                                "Linear"]
