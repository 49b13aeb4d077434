"""fastlayers.fuse / unfuse and hooks: a Linear or ReLU carrying any hook (forward,
backward, state_dict, load_state_dict; on either module, in nested containers) is left
unfused and named, and the hook sees what it saw before; global hooks leave every pair."""
import warnings

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.convert import SkippedFusionWarning


def _types(model):
    return [type(m).__name__ for m in model.modules()]


def _first(args):
    return args[0].detach().clone() if args[0] is not None else None


# the hook kinds fuse() names -> register one on a module, appending what it sees to log
HOOKS = {
    "forward hook": lambda m, log: m.register_forward_hook(
        lambda mod, i, o: log.append(o.detach().clone())),
    "forward pre-hook": lambda m, log: m.register_forward_pre_hook(
        lambda mod, i: log.append(_first(i))),
    "backward hook": lambda m, log: m.register_backward_hook(
        lambda mod, gi, go: log.append(_first(go))),
    "full backward hook": lambda m, log: m.register_full_backward_hook(
        lambda mod, gi, go: log.append(_first(go))),
    "backward pre-hook": lambda m, log: m.register_full_backward_pre_hook(
        lambda mod, go: log.append(_first(go))),
    "state_dict hook": lambda m, log: m.register_state_dict_post_hook(
        lambda mod, sd, prefix, meta: log.append(len(sd))),
    "state_dict pre-hook": lambda m, log: m.register_state_dict_pre_hook(
        lambda mod, prefix, keep_vars: log.append(prefix)),
    "load_state_dict pre-hook": lambda m, log: m.register_load_state_dict_pre_hook(
        lambda mod, sd, prefix, *rest: log.append(prefix)),
    "load_state_dict post-hook": lambda m, log: m.register_load_state_dict_post_hook(
        lambda mod, keys: log.append(len(keys.missing_keys))),
}


def _observe(model, x):
    """Everything a hook can see: forward, backward, state_dict and load_state_dict."""
    y = model(x)
    y.backward(torch.linspace(-1, 2, y.numel()).reshape(y.shape))
    model.load_state_dict(model.state_dict())
    return y


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("where", ["Linear", "ReLU"])
def test_a_hooked_pair_is_left_unfused_named_and_its_hook_sees_the_same(backend, hook, where):
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU()).to(backend)
    log_plain = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # register_backward_hook's deprecation
        HOOKS[hook](plain[0 if where == "Linear" else 1], log_plain)
    with pytest.warns(SkippedFusionWarning) as caught:
        fused = fastlayers.fuse(plain)
    path = "0" if where == "Linear" else "1"
    assert caught[0].message.skipped == [(path, f"nn.{where} carries a {hook}")]
    assert f"'{path}': nn.{where} carries a {hook}" in str(caught[0].message)
    assert _types(fused)[1:] == ["Linear", "ReLU", "LinearReLU", "Identity"]  # the rest fused

    x = torch.randn(3, 5, device=backend, requires_grad=True)
    log_plain.clear()
    y_plain = _observe(plain, x)
    seen_plain = list(log_plain)
    log_plain.clear()  # the copied hook appends to the same list
    y_fused = _observe(fused, x)
    assert seen_plain and len(log_plain) == len(seen_plain)
    exact = not fastlayers._backend.use_triton(x)
    for got, want in zip(log_plain, seen_plain):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5,
                                                                       atol=1e-6)
        else:
            assert got == want
    assert torch.equal(y_fused, y_plain) if exact else torch.allclose(y_fused, y_plain,
                                                                      rtol=1e-5, atol=1e-6)


def test_hooks_on_both_and_in_nested_containers_are_all_listed():
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Identity(), inner))
    model[0].register_forward_pre_hook(lambda m, i: None)
    model[1].register_forward_hook(lambda m, i, o: None)
    inner[0].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.warns(SkippedFusionWarning, match=r"'2\.1\.0'") as caught:
        fused = fastlayers.fuse(model)
    assert caught[0].message.skipped == [
        ("0", "nn.Linear carries a forward pre-hook"), ("1", "nn.ReLU carries a forward hook"),
        ("2.1.0", "nn.Linear carries a full backward hook")]
    assert _types(fused) == _types(model)


def test_global_module_hooks_leave_every_pair_alone():
    seen = []
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        with pytest.warns(SkippedFusionWarning, match="global module forward hook") as caught:
            fused = fastlayers.fuse(model)
        assert [p for p, _ in caught[0].message.skipped] == ["0", "2"]
        assert _types(fused) == _types(model)
        fused(torch.randn(2, 3))
        assert seen == ["Linear", "ReLU", "Linear", "ReLU", "Sequential"]
    finally:
        handle.remove()
    with warnings.catch_warnings():  # gone with the handle: fused, quietly
        warnings.simplefilter("error")
        assert "LinearReLU" in _types(fastlayers.fuse(model))


def test_unfuse_leaves_a_hooked_fused_pair_and_says_so():
    fused = fastlayers.fuse(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()))
    fused[2].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(SkippedFusionWarning, match="unfuse") as caught:
        back = fastlayers.unfuse(fused)
    assert caught[0].message.skipped == [("2", "LinearReLU carries a forward hook")]
    assert _types(back)[1:] == ["Linear", "ReLU", "LinearReLU", "Identity"]
