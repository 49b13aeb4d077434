"""Python arguments get the checks their functional forms give, on both paths: an int past
float's range is a clear ValueError (not a bare OverflowError), the modules refuse a c or
threshold the functional form refuses (not coerced with float()), and MySequential takes
the indices nn.Sequential takes."""
import numpy as np
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers import functional as F

from _util import randn

HUGE = 10 ** 400


@pytest.mark.parametrize("call, words", [
    (lambda d: F.fixed_hidden(randn(2, 3, device=d), randn(3, 4, device=d), c=HUGE),
     ["fixed_hidden: c", "1329 bits"]),
    (lambda d: F.fixed_hidden_mlp(randn(2, 3, device=d), randn(3, 3, device=d), None,
                                  randn(3, 3, device=d), c=-HUGE), ["fixed_hidden_mlp: c"]),
    (lambda d: F.halve_until(randn(5, device=d), HUGE), ["halve_until: threshold"]),
    (lambda d: F.fixed_hidden_mlp(randn(2, 3, device=d), randn(3, 3, device=d), None,
                                  randn(3, 3, device=d), threshold=HUGE),
     ["fixed_hidden_mlp: threshold"]),
])
def test_ints_past_floats_range_are_a_clear_error(backend, call, words):
    with pytest.raises(ValueError) as info:
        call(backend)
    for word in words + ["beyond float's range"]:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("build, exc, words", [
    (lambda: fastlayers.FixedHiddenMLP(c=True), TypeError, ["FixedHiddenMLP: c", "bool"]),
    (lambda: fastlayers.FixedHiddenMLP(c=torch.tensor(2.0)), TypeError, ["Tensor"]),
    (lambda: fastlayers.FixedHiddenMLP(threshold="2"), TypeError, ["threshold", "str"]),
    (lambda: fastlayers.FixedHiddenMLP(threshold=0.0), ValueError, ["threshold must be > 0"]),
    (lambda: fastlayers.FixedHiddenMLP(c=HUGE), ValueError, ["beyond float's range"]),
    (lambda: fastlayers.FixedHiddenMatmul(3, 4, c="1"), TypeError, ["FixedHiddenMatmul: c"]),
])
def test_modules_refuse_what_the_functional_form_refuses(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_modules_keep_the_numbers_they_are_given(backend):
    """ints and numpy floats are numbers; the module computes with them as floats."""
    mlp = fastlayers.FixedHiddenMLP(6, c=2, threshold=np.float64(3.0)).to(backend)
    assert (mlp.c, mlp.threshold) == (2.0, 3.0)
    x = randn(4, 6, device=backend)
    want = F.fixed_hidden_mlp(x, mlp.linear.weight, mlp.linear.bias, mlp.rand_weight, c=2.0,
                              threshold=3.0)
    assert torch.equal(mlp(x), want)


def test_my_sequential_takes_the_indices_nn_sequential_takes():
    layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)]
    net, ref = fastlayers.MySequential(*layers), nn.Sequential(*layers)
    for idx in (0, -1, np.int64(2), torch.tensor(1)):
        assert net[idx] is ref[idx]
    for idx, exc in (("0", TypeError), (1.0, TypeError), (3, IndexError), (-4, IndexError)):
        with pytest.raises(exc):
            ref[idx]
        with pytest.raises(exc, match="MySequential"):
            net[idx]
