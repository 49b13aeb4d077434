"""fastlayers.io.load_model is all or nothing (issue 12, item 5 of the issue / 3 of the
task): every key's type, shape and dtype kind is checked first, and a failed load, wherever
it fails in the key order, leaves every parameter and buffer bitwise as it was."""
import pytest
import torch
from torch import nn

from fastlayers import io as fio


class _Exploding(nn.Linear):
    """A layer whose state_dict hook raises: torch has already copied the keys before it."""

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("hook exploded")


def _model(middle=nn.Linear):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), middle(7, 3), nn.Linear(3, 2),
                        nn.BatchNorm1d(2))
    net.register_buffer("scale", torch.randn(4, dtype=torch.float64))
    with torch.no_grad():
        net[4].running_mean.normal_()
        net[4].num_batches_tracked += 3
    return net


def _other_state():
    """A state_dict for _model() whose every value differs from _model()'s."""
    torch.manual_seed(2)
    state = _model().state_dict()
    return {k: (v + 1 if v.dtype == torch.int64 else torch.randn_like(v)) for k, v in state.items()}


def _snapshot(model):
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bitwise_unchanged(model, snapshot):
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(snapshot)
    for k, (obj, value) in snapshot.items():
        assert now[k] is obj, k  # the same tensor objects
        a, b = now[k].detach().contiguous(), value.contiguous()
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("fmt, damage", [
    (fmt, damage) for fmt in ("pt", "safetensors")
    for damage in ("not a tensor", "integer dtype", "bool dtype", "shape")
    if not (fmt == "safetensors" and damage == "not a tensor")])  # safetensors: tensors only
def test_strict_failure_in_the_middle_leaves_the_model_bitwise_unchanged(tmp_path, fmt, damage):
    state = _other_state()
    middle = "2.weight"
    assert list(state).index(middle) not in (0, len(state) - 1)
    if damage == "not a tensor":
        state[middle] = 7
        message = r"type mismatch for 2\.weight: file has a int, model has a torch\.float32 tensor"
    elif damage == "integer dtype":
        state[middle] = torch.randint(-5, 5, (3, 7))
        message = r"type mismatch for 2\.weight: file has a torch\.int64 tensor"
    elif damage == "bool dtype":
        state[middle] = torch.rand(3, 7) > 0.5
        message = r"type mismatch for 2\.weight: file has a torch\.bool tensor"
    else:
        state[middle] = torch.randn(7, 3)
        message = r"shape mismatch for 2\.weight: file has \[7, 3\], model has \[3, 7\]"
    path = tmp_path / f"s.{fmt}"
    fio.save(state, path)
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(fio.StateDictMismatchError, match=message):
        fio.load_model(model, path)
    _assert_bitwise_unchanged(model, snapshot)
    report = fio.load_model(model, path, strict=False)  # everything else loads
    assert not report.ok and [k for k, *_ in report.wrong_type + report.mismatched] == [middle]
    for k, v in model.state_dict().items():
        if k != middle:
            assert torch.equal(v, state[k]), k
        else:
            assert torch.equal(v, snapshot[k][1])


def test_dtype_conversion_within_a_kind_is_allowed(tmp_path):
    state = {k: v.double() if v.is_floating_point() else v for k, v in _other_state().items()}
    fio.save(state, tmp_path / "f64.pt")
    model = _model()
    assert fio.load_model(model, tmp_path / "f64.pt").ok
    for k, v in model.state_dict().items():
        assert v.dtype == _model().state_dict()[k].dtype and torch.equal(v, state[k].to(v.dtype))


@pytest.mark.parametrize("strict", [True, False])
def test_exception_from_torch_mid_load_puts_everything_back(tmp_path, strict):
    """torch copies 0.* before the hook of layer 2 raises: those copies are undone."""
    state = _other_state()
    fio.save(state, tmp_path / "s.pt")
    model = _model(middle=_Exploding)
    snapshot = _snapshot(model)
    with pytest.raises(fio.StateDictMismatchError, match=r"s\.pt into Sequential: hook exploded "
                                                         r"\(the model was left as it was\)") as info:
        fio.load_model(model, tmp_path / "s.pt", strict=strict)
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_bitwise_unchanged(model, snapshot)


def test_copy_failure_from_the_meta_device_puts_everything_back(tmp_path):
    fio.save(_other_state(), tmp_path / "s.pt")
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(fio.StateDictMismatchError, match=r"the model was left as it was"):
        fio.load_model(model, tmp_path / "s.pt", map_location="meta")
    _assert_bitwise_unchanged(model, snapshot)


def test_missing_and_unexpected_keys_in_strict_mode_undo_the_load(tmp_path):
    state = _other_state()
    del state["3.bias"]
    state["extra"] = torch.randn(2)
    fio.save(state, tmp_path / "s.safetensors")
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(fio.StateDictMismatchError) as info:
        fio.load_model(model, tmp_path / "s.safetensors")
    assert "1 missing key(s) (in the model, not in the file): 3.bias" in str(info.value)
    assert "1 unexpected key(s) (in the file, not in the model): extra" in str(info.value)
    _assert_bitwise_unchanged(model, snapshot)


class _Counter(nn.Module):
    """A module with extra state (get_extra_state / set_extra_state), e.g. a step count."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.step = 0

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = state["step"]


@pytest.mark.parametrize("failure", ["hook", "strict"])
def test_a_failed_load_puts_modules_extra_state_back(tmp_path, failure):
    """Extra state is set by torch as it walks the modules: a later failure (a raising
    hook, or strict mode's missing key) puts it back with the tensors."""
    src = nn.Sequential(_Counter(), nn.Linear(2, 2))
    src[0].step = 7
    state = src.state_dict()
    if failure == "strict":
        del state["1.bias"]
    fio.save(state, tmp_path / "s.pt")
    dst = nn.Sequential(_Counter(), _Exploding(2, 2) if failure == "hook" else nn.Linear(2, 2))
    tensors = {k: v.detach().clone() for k, v in dst.state_dict().items()
               if isinstance(v, torch.Tensor)}
    with pytest.raises(fio.StateDictMismatchError):
        fio.load_model(dst, tmp_path / "s.pt")
    assert dst[0].step == 0
    for k, v in tensors.items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert fio.load_model(dst[:1], tmp_path / "s.pt", strict=False).missing_keys == []
    assert dst[0].step == 7  # a load that succeeds does set it
