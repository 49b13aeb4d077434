"""load_model's all-or-nothing promise where a load goes wrong half-way: a tensor torch
cannot write, extra state set in place or replaced, a load hook writing a key the file
lacks; a meta-device model; and conversions that would change values."""
import pytest
import torch
from torch import nn

from fastlayers import io


def _values(model):
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict().items()}


def _same(model, before):
    now = model.state_dict()
    assert list(now) == list(before)
    for k, v in before.items():
        assert torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v, k


def test_putting_back_skips_tensors_the_load_left_unchanged(tmp_path):
    """An inference tensor cannot be written (torch's load fails on it), but it still holds
    its value: putting the model back leaves it alone, so the error says the model is as
    it was rather than that putting it back failed."""
    model = nn.Linear(2, 2)
    with torch.inference_mode():
        model.register_buffer("stat", torch.zeros(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["junk"] = torch.zeros(1)
    io.save(state, tmp_path / "m.pt")
    with pytest.raises(io.StateDictMismatchError) as info:
        io.load_model(model, tmp_path / "m.pt")
    assert str(info.value).endswith("(the model was left as it was)")


def test_a_tensor_torch_cannot_write_fails_cleanly_and_puts_the_rest_back(tmp_path):
    def make():
        m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        with torch.inference_mode():  # a buffer made there cannot be written outside
            m[0].register_buffer("stat", torch.zeros(2))
        return m
    src = make()
    with torch.no_grad():
        for t in src.parameters():
            t.fill_(1.0)
    io.save(src.state_dict(), tmp_path / "m.pt")
    dst = make()
    before = _values(dst)
    with pytest.raises(io.StateDictMismatchError, match="cannot load"):
        io.load_model(dst, tmp_path / "m.pt")
    _same(dst, before)


class _InPlaceState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.cfg = nn.Linear(2, 2), {"step": 0}

    def get_extra_state(self):
        return self.cfg

    def set_extra_state(self, state):
        self.cfg.update(state)  # in place


class _ReplacedState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.ema = nn.Linear(2, 2), torch.zeros(2)

    def get_extra_state(self):
        return self.ema

    def set_extra_state(self, state):
        self.ema = state  # a new object


@pytest.mark.parametrize("cls", [_InPlaceState, _ReplacedState])
def test_extra_state_set_in_place_or_replaced_is_put_back(tmp_path, cls):
    src = cls()
    if cls is _InPlaceState:
        src.cfg["step"] = 1000
    else:
        src.ema = torch.full((2,), 5.0)
    state = src.state_dict()
    state["unexpected.key"] = torch.ones(1)  # the strict load fails after loading the rest
    io.save(state, tmp_path / "m.pt")
    dst = cls()
    with pytest.raises(io.StateDictMismatchError, match="unexpected.key"):
        io.load_model(dst, tmp_path / "m.pt")
    if cls is _InPlaceState:
        assert dst.cfg == {"step": 0}
    else:
        assert torch.equal(dst.ema, torch.zeros(2))


class _Compat(nn.Module):
    """A newer version added buffer 'scale'; its load hook gives old files a default."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", torch.full((2,), 3.0))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.setdefault(prefix + "scale", torch.ones(2))
        super()._load_from_state_dict(state_dict, prefix, *args)


def test_a_load_hook_writing_a_key_the_file_lacks_is_put_back(tmp_path):
    state = _Compat().state_dict()
    del state["scale"]
    state["junk"] = torch.zeros(1)
    io.save(state, tmp_path / "m.pt")
    dst = _Compat()
    before = _values(dst)
    with pytest.raises(io.StateDictMismatchError, match="junk"):
        io.load_model(dst, tmp_path / "m.pt")
    _same(dst, before)


def test_a_meta_model_is_refused_not_loaded_into_nothing(tmp_path):
    io.save(nn.Linear(3, 2).state_dict(), tmp_path / "m.pt")
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(io.StateDictMismatchError, match="meta device.*to_empty"):
        io.load_model(model, tmp_path / "m.pt")


class _Typed(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(3, dtype=torch.int8))
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float16))


@pytest.mark.parametrize("strict", [True, False])
def test_conversions_that_change_values_are_reported(tmp_path, strict):
    """Within a dtype kind torch converts; a value the model's dtype cannot hold (an int
    out of range, a finite float that overflows) is a mis-typed key, not a silent change.
    Rounding (float64 -> float16 of an in-range value) still loads."""
    cases = {"count": torch.tensor([1, 300, -2]),
             "w": torch.tensor([1.0, 1e10], dtype=torch.float64)}
    io.save(cases, tmp_path / "bad.pt")
    model = _Typed()
    before = _values(model)
    if strict:
        with pytest.raises(io.StateDictMismatchError, match="int8 cannot hold"):
            io.load_model(model, tmp_path / "bad.pt")
    else:
        report = io.load_model(model, tmp_path / "bad.pt", strict=False)
        assert sorted(k for k, *_ in report.wrong_type) == ["count", "w"]
    _same(model, before)
    fine = {"count": torch.tensor([1, 100, -2]), "w": torch.tensor([1.0, 0.1], dtype=torch.float64)}
    io.save(fine, tmp_path / "fine.pt")
    assert io.load_model(model, tmp_path / "fine.pt").ok
    assert model.count.tolist() == [1, 100, -2] and model.w[1] == torch.tensor(0.1).half()


class _HookTouchesAnInferenceBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.inference_mode():
            self.register_buffer("stat", torch.zeros(2))  # first in the state_dict
        self.lin = nn.Linear(2, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        with torch.inference_mode():
            self.stat.add_(1)  # a change nothing outside inference_mode can undo
        super()._load_from_state_dict(state_dict, prefix, *args)


def test_putting_back_goes_on_past_a_tensor_it_cannot_write(tmp_path):
    """The rest of the model is still put back, and the error says what could not be."""
    src = _HookTouchesAnInferenceBuffer()
    state = {k: v for k, v in src.state_dict().items() if k != "stat"}  # strict load fails
    with torch.no_grad():
        state = {k: v + 1 for k, v in state.items()}
    io.save(state, tmp_path / "m.pt")
    dst = _HookTouchesAnInferenceBuffer()
    weight, bias = dst.lin.weight.detach().clone(), dst.lin.bias.detach().clone()
    with pytest.raises(io.StateDictMismatchError, match="putting the model back failed"):
        io.load_model(dst, tmp_path / "m.pt")
    assert torch.equal(dst.lin.weight, weight) and torch.equal(dst.lin.bias, bias)
