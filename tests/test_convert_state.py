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
