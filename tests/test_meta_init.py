"""Every fastlayers module with tensors of its own can be built on the meta device and
materialised the way torch's modules are: ``to_empty()``, then ``reset_parameters()``,
which draws what the constructor draws (bitwise, from the same RNG state) and leaves a
module that computes the plain-torch float64 result on both paths (no uninitialised
memory reaches a forward)."""
import pytest
import torch

import fastlayers

from _util import assert_close_to_ref, randn


def _linear_relu(m, x):
    return torch.relu(x @ m.weight.double().T + m.bias.double())


def _my_linear(m, x):
    return torch.relu(x @ m.weight.double() + m.bias.double())


def _fixed_hidden_matmul(m, x):
    return torch.relu(x @ m.weight.double() + m.c)


def _fixed_hidden_mlp(m, x):
    """The seed's forward, literally, in float64 (its loop halves until |X|.sum() <= 1)."""
    w, b = m.linear.weight.double(), m.linear.bias.double()
    X = x @ w.T + b
    X = torch.relu(X @ m.rand_weight.double() + 1)
    X = X @ w.T + b
    while X.abs().sum() > 1:
        X /= 2
    return X


MODULES = {  # name: (constructor, float64 reference)
    "LinearReLU": (lambda **kw: fastlayers.LinearReLU(11, 7, **kw), _linear_relu),
    "MyLinear": (lambda **kw: fastlayers.MyLinear(11, 7, **kw), _my_linear),
    "FixedHiddenMatmul": (lambda **kw: fastlayers.FixedHiddenMatmul(11, 7, **kw),
                          _fixed_hidden_matmul),
    "FixedHiddenMLP": (lambda **kw: fastlayers.FixedHiddenMLP(11, **kw), _fixed_hidden_mlp),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_meta_module_materialises_with_the_constructors_init(backend, name):
    build, ref = MODULES[name]
    torch.manual_seed(7)
    direct = build(device=backend)
    with torch.device("meta"):
        module = build()
    module.to_empty(device=backend)
    with torch.no_grad():  # what uninitialised memory might hold
        for t in list(module.parameters()) + list(module.buffers()):
            t.fill_(float("nan"))
    torch.manual_seed(7)
    module.reset_parameters()
    want = direct.state_dict()
    got = module.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].device == want[key].device and torch.equal(got[key], want[key]), key
    x = randn(5, 11, device=backend)
    assert_close_to_ref(module(x), ref(module, x.double()))
