"""The fastlayers compile backend leaves alone what it must not fuse (other users of the
pre-activation, in-place ReLU on a shared tensor, hooks, float64, type promotion, mean
without keepdim, in-place ops in between) and still gives eager torch's results; options
(pattern choice, inner compiler, errors) and ``fastlayers.explain``."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastlayers
from fastlayers.compile_backend import backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Fn(nn.Module):
    """A module whose forward is ``fn(self, x)``, with one Linear(7, 5) and a frozen W."""

    def __init__(self, fn, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(7, 5, dtype=dtype)
        self.act = nn.ReLU()
        self.register_buffer("frozen", torch.randn(7, 5, dtype=dtype))
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def compile_and_compare(model, x, patterns=None, grad=True):
    """Run compiled and eager on the same input (and backward); return the report."""
    b = backend(patterns, inner="aot_eager")
    compiled = torch.compile(model, backend=b, fullgraph=True)
    results = []
    for m in (compiled, model):
        xi = x.detach().clone().requires_grad_(grad)
        out = m(xi)
        outs = out if isinstance(out, tuple) else (out,)
        if grad:
            sum(o.double().sin().sum() for o in outs).backward()
        results.append((tuple(o.detach() for o in outs), xi.grad, model.fc.weight.grad))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    return b.report


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------- must not fuse
def test_two_calls_of_one_linear_fuse_only_the_one_with_a_relu():
    report = compile_and_compare(Fn(lambda s, x: (F.relu(s.fc(x)), s.fc(x))), _x(3, 7))
    assert report.counts()["linear_relu"] == 1 and not report.skipped


def _returned(s, x):
    y = s.fc(x)
    return F.relu(y), y


def _read_elsewhere(s, x):
    y = s.fc(x)
    return F.relu(y) + y.sum()


def _in_place_relu_of_shared(s, x):
    y = s.fc(x)
    total = y.sum()
    return total, F.relu(y, inplace=True)


def _relu_module_of_shared(s, x):
    y = s.fc(x)
    return s.act(y), y * 2


@pytest.mark.parametrize("fn", [_returned, _read_elsewhere, _in_place_relu_of_shared,
                                _relu_module_of_shared])
def test_pre_activation_with_another_user_is_not_fused(fn):
    report = compile_and_compare(Fn(fn), _x(3, 7))
    assert report.counts()["linear_relu"] == 0
    assert report.skipped and all("other users" in r for r in report.reasons("linear_relu"))
    assert "left alone: `" in str(report)


def test_relu_output_with_many_users_is_fused():
    def fn(s, x):
        h = F.relu(s.fc(x))
        return h, h * 3, h.sum()
    report = compile_and_compare(Fn(fn), _x(2, 3, 7))
    assert report.counts()["linear_relu"] == 1


@pytest.mark.parametrize("hook_on", ["fc", "act"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_hooked_linear_or_relu_is_not_fused(hook_on, kind):
    """Even a hook that only counts calls (no tensor in the graph) keeps the pattern."""
    model = Fn(lambda s, x: s.act(s.fc(x)))
    calls = []
    register = getattr(getattr(model, hook_on), f"register_{kind}_hook")
    register(lambda *args: calls.append(1))
    report = compile_and_compare(model, _x(4, 7))
    assert calls  # the hook ran
    assert report.counts()["linear_relu"] == 0
    assert any("hooks" in r for r in report.reasons("linear_relu")), report


def test_hook_on_the_enclosing_block_still_fuses():
    """A hook on a module around the whole pattern sees only its input and output."""
    inner = Fn(lambda s, x: s.act(s.fc(x)))
    model = nn.Sequential(inner)
    seen = []
    inner.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    b = backend(inner="aot_eager")
    x = _x(4, 7)
    got = torch.compile(model, backend=b)(x)
    torch.testing.assert_close(got, model(x))
    torch.testing.assert_close(seen[0], seen[1])
    assert b.report.counts()["linear_relu"] == 1


def test_hook_that_stores_the_pre_activation_sees_eager_values():
    model = Fn(lambda s, x: s.act(s.fc(x)))
    seen = []
    model.fc.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    b = backend(inner="aot_eager")
    x = _x(4, 7)
    torch.compile(model, backend=b)(x)
    model(x)
    assert len(seen) == 2 and (seen[0] < 0).any()  # the pre-activation, not relu'd
    torch.testing.assert_close(seen[0], seen[1])
    assert b.report.counts()["linear_relu"] == 0


def test_float64_is_left_to_torch():
    model = Fn(lambda s, x: (F.relu(s.fc(x)), torch.relu(x @ s.frozen + 1),
                             x - x.mean()), dtype=torch.float64)
    report = compile_and_compare(model, _x(3, 7, dtype=torch.float64))
    assert sum(report.counts().values()) == 0
    assert len(report.skipped) == 3 and all("float64" in r for r in report.reasons())


def test_complex_centering_is_left_to_torch():
    model = Fn(lambda s, x: x - x.mean(-1, keepdim=True))
    report = compile_and_compare(model, _x(3, 7, dtype=torch.complex64), grad=False)
    assert report.counts()["centered"] == 0
    assert any("complex64" in r for r in report.reasons("centered"))


def test_integer_matmul_relu_is_left_to_torch():
    w = torch.randint(-3, 4, (7, 5))
    model = Fn(lambda s, x: torch.relu(x @ w + 1))
    x = torch.randint(-3, 4, (4, 7))
    b = backend(inner="aot_eager")
    assert torch.equal(torch.compile(model, backend=b, fullgraph=True)(x), model(x))
    assert b.report.counts()["fixed_hidden"] == 0
    assert any("int64" in r for r in b.report.reasons("fixed_hidden"))


def test_type_promotion_in_bias_add_is_left_to_torch():
    bias64 = torch.randn(5, dtype=torch.float64)
    model = Fn(lambda s, x: torch.relu(x @ s.frozen + bias64))
    report = compile_and_compare(model, _x(3, 7))
    assert report.counts()["linear_relu"] == 0 and report.skipped


def test_trainable_weight_with_constant_is_not_fixed_hidden():
    """relu(x @ W + c) with W requiring grad: fixed_hidden has no weight gradient."""
    model = Fn(lambda s, x: torch.relu(x @ s.fc.weight.t() + 2.0))
    report = compile_and_compare(model, _x(3, 7))
    assert report.counts()["fixed_hidden"] == 0
    assert any("requires grad" in r for r in report.reasons("fixed_hidden"))


@pytest.mark.parametrize("fn, fused", [
    (lambda s, x: x - x.mean(), 1),
    (lambda s, x: x - torch.mean(x, dim=(0, 2), keepdim=True), 1),
    (lambda s, x: x.sub(x.mean(-1, True)), 1),
    (lambda s, x: x - x.mean(0), 0),  # no keepdim: left alone (equal only for leading dims)
    (lambda s, x: x - (x * 2).mean(), 0),                 # mean of another tensor
    (lambda s, x: x.mean() - x, 0),                       # reversed
])
def test_centered_forms(fn, fused):
    report = compile_and_compare(Fn(fn), _x(4, 3, 3))
    assert report.counts()["centered"] == fused


def test_in_place_op_between_mean_and_subtract_is_not_fused():
    def fn(s, x):
        y = x * 1.0
        m = y.mean()
        y.add_(1.0)
        return y - m
    report = compile_and_compare(Fn(fn), _x(5, 7))
    assert report.counts()["centered"] == 0
    assert any("in-place" in r for r in report.reasons("centered"))


def _linear_under_autocast(s, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = s.fc(x)
    return F.relu(y)


def _linear_under_no_grad(s, x):
    with torch.no_grad():
        y = s.fc(x)
    return F.relu(y), torch.relu(x @ s.frozen + 1)


def _relu_under_no_grad(s, x):
    y = s.fc(x)
    with torch.no_grad():
        return F.relu(y)


@pytest.mark.parametrize("fn", [_linear_under_autocast, _linear_under_no_grad,
                                _relu_under_no_grad])
def test_grad_mode_or_autocast_switch_inside_the_pattern_is_not_fused(fn):
    """The fused op would run under the last op's settings: other dtype, other grad."""
    model = Fn(fn)
    b = backend(inner="aot_eager")
    x = _x(3, 7, dtype=torch.float32).requires_grad_(True)
    got, want = torch.compile(model, backend=b, fullgraph=True)(x), model(x)
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert g.dtype == w.dtype and g.requires_grad == w.requires_grad
        torch.testing.assert_close(g, w)
    assert b.report.counts()["linear_relu"] == 0
    assert any("grad mode, autocast" in r for r in b.report.reasons("linear_relu"))


def test_matmul_forms_of_linear_relu():
    model = Fn(lambda s, x: (torch.relu(torch.addmm(s.fc.bias, x, s.fc.weight.t())),
                             F.relu(s.fc.bias + x @ s.fc.weight.T),
                             torch.relu(torch.mm(x, s.frozen) + 1)))
    report = compile_and_compare(model, _x(6, 7))
    assert report.counts() == {"linear_relu": 2, "centered": 0, "fixed_hidden": 1}


# ---------------------------------------------------------------------------- options
def _all_three(s, x):
    h = F.relu(s.fc(x))
    return h - h.mean(), torch.relu(x @ s.frozen + 1)


@pytest.mark.parametrize("patterns", [{"linear_relu"}, {"centered", "fixed_hidden"}, set()])
def test_patterns_option_chooses_what_fuses(patterns):
    report = compile_and_compare(Fn(_all_three), _x(3, 7), patterns=patterns)
    assert report.counts() == {p: int(p in patterns) for p in report.counts()}
    assert report.reasons() == ["pattern not selected"] * (3 - len(patterns))


def test_options_through_torch_compile_with_the_named_backend():
    from fastlayers.compile_backend import fastlayers_backend
    fastlayers_backend.report.clear()
    model = Fn(_all_three)
    compiled = torch.compile(model, backend="fastlayers",
                             options={"patterns": ["centered"], "inner": "aot_eager"})
    x = _x(3, 7)
    torch.testing.assert_close(compiled(x), model(x))
    assert fastlayers_backend.report.counts() == {"linear_relu": 0, "centered": 1,
                                                  "fixed_hidden": 0}


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pattern.*'gelu'"):
        backend(patterns={"gelu"})
    with pytest.raises(ValueError, match="inner must be one of"):
        backend(inner="tvm")


# ---------------------------------------------------------------------------- explain
def test_explain_reports_lines_and_leaves_the_model_alone():
    model = Fn(_all_three)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fastlayers.explain(model, _x(3, 7))
    assert report.counts() == {"linear_relu": 1, "centered": 1, "fixed_hidden": 1}
    code = {f.pattern: f.code for f in report.fusions}
    assert code == {"linear_relu": "h = F.relu(s.fc(x))",
                    "centered": "return h - h.mean(), torch.relu(x @ s.frozen + 1)",
                    "fixed_hidden": "return h - h.mean(), torch.relu(x @ s.frozen + 1)"}
    assert all(f.location.startswith(__file__ + ":") for f in report.fusions)
    assert "linear_relu x1" in str(report)
    assert type(model.fc) is nn.Linear and not model.fc._forward_hooks
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_centering_is_left_to_torch(dtype):
    """Eager 16-bit ``x - x.mean()`` rounds the mean to 16 bits first; the fused op keeps it
    in fp32 and rounds once, so the results differ in the last bit: left alone, and the
    compiled model's outputs and gradients equal eager's bitwise."""
    model = Fn(lambda s, x: (x - x.mean(), x - x.mean(-1, keepdim=True))).to(dtype)
    x = (torch.randn(4, 6) * 3 + 1).to(dtype)
    b = backend(inner="aot_eager")
    compiled = torch.compile(model, backend=b, fullgraph=True)
    got, want = compiled(x), model(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert b.report.counts()["centered"] == 0
    assert len(b.report.reasons("centered")) == 2
    assert all("rounds the mean to 16 bits" in r for r in b.report.reasons("centered"))
