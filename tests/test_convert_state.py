"""fuse(): pairs the rewrite would change are left alone and named: a Linear holding more
than weight and bias, a Linear or ReLU whose forward is set on the instance."""
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.convert import SkippedFusionWarning



def test_a_pair_the_rewrite_would_change_is_left_unfused_and_named(backend):
    """A Linear holding more than weight and bias (an extra Parameter, a buffer), and a
    Linear or ReLU with a forward set on the instance: fusing would drop that state (new
    state_dict keys, parameters an optimizer no longer sees) or bypass that forward. Such
    pairs stay as they are, named in the warning; the model's output, keys and parameters
    are unchanged (bitwise on the torch path; the one fused pair within rounding on the
    kernels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    model[0].scale = nn.Parameter(torch.ones(4))
    model[0].register_buffer("mask", torch.ones(4))
    original_forward = model[2].forward
    model[2].forward = lambda t: original_forward(t) * -1.0
    model[5].forward = lambda t: t  # a "ReLU" that passes everything
    model.to(backend)
    x = torch.randn(5, 3, device=backend)
    want, keys = model(x), list(model.state_dict())
    with pytest.warns(SkippedFusionWarning) as caught:
        fused = fastlayers.fuse(model)
    assert caught[0].message.skipped == [
        ("0", "nn.Linear holds state the new layer would drop (scale, mask)"),
        ("2", "nn.Linear holds a forward set on the instance"),
        ("5", "nn.ReLU holds a forward set on the instance")]
    names = [type(m).__name__ for m in fused.children()]
    assert names[:6] == [type(m).__name__ for m in model.children()][:6]  # the last pair only
    assert type(fused[6]) is fastlayers.LinearReLU
    torch.testing.assert_close(fused(x), want, rtol=2e-6, atol=2e-6)
    if fastlayers.backend_info()["devices"][x.device.type]["path"] == "torch":
        assert torch.equal(fused(x), want)
    assert list(fused.state_dict()) == keys
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_lazy_layers_loaded_but_not_called_convert_with_their_loaded_sizes():
    """A lazy layer materialised by load_state_dict still says in_features=0 until its first
    call; fuse()/unfuse() build the other class from the loaded weight's shape."""
    sd = nn.Sequential(nn.Linear(5, 3), nn.ReLU()).state_dict()
    seq = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    seq.load_state_dict(sd)
    fused = fastlayers.fuse(seq, inplace=False)
    assert type(fused[0]) is fastlayers.LinearReLU and fused[0].in_features == 5
    lazy = nn.Sequential(fastlayers.LazyLinearReLU(3), nn.Identity())
    lazy.load_state_dict(sd)
    plain = fastlayers.unfuse(lazy, inplace=False)
    assert type(plain[0]) is nn.Linear and plain[0].in_features == 5
    x = torch.randn(2, 5)
    assert torch.equal(fused(x), seq(x)) and torch.equal(plain(x), seq(x))
