"""torch.jit.trace of fastlayers modules, on both paths: the tracer records torch's ops
(a Triton launch cannot be recorded, so the kernel path traces the torch path), with
torch's default sanity check (``check_trace=True``: it re-runs the model under no_grad and
compares graphs), and the traced module is right at batch sizes it was not traced at.
The halving loop is the one exception, documented: k becomes a constant of the graph, as it
does when the seed's own loop is traced, and a warning says so."""
import warnings

import pytest
import torch
from torch.nn import functional as TF

import fastlayers
from fastlayers.reference import halve_until_loop

from _util import assert_close_to_ref, randn


def _ref_linear_relu(m, x):
    w, b = m.weight.double(), None if m.bias is None else m.bias.double()
    return torch.relu(TF.linear(x.double(), w, b))


def _ref_mylinear(m, x):
    return torch.relu(x.double() @ m.weight.double() + m.bias.double())


def _ref_fixed_hidden(m, x):
    return torch.relu(x.double() @ m.weight.double() + 1.0)


# name: (factory, features, float64 reference of the module's math). Centering traces at 4x8
# (a power-of-two size, where the eager CPU path takes its one-op formula) and runs at 5x8.
MODULES = {
    "LinearReLU": (lambda: fastlayers.LinearReLU(8, 7), 8, _ref_linear_relu),
    "LinearReLU-nobias": (lambda: fastlayers.LinearReLU(8, 7, bias=False), 8, _ref_linear_relu),
    "MyLinear": (lambda: fastlayers.MyLinear(8, 5), 8, _ref_mylinear),
    "CenteredLayer": (lambda: fastlayers.CenteredLayer(), 8, lambda m, x: x.double() - x.double().mean()),
    "CenteredLayer-dim": (lambda: fastlayers.CenteredLayer(dim=-1), 8,
                          lambda m, x: x.double() - x.double().mean(-1, keepdim=True)),
    "FixedHiddenMatmul": (lambda: fastlayers.FixedHiddenMatmul(8, 6), 8, _ref_fixed_hidden),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_traced_module_matches_float64_at_new_batch_sizes(backend, name):
    factory, features, ref = MODULES[name]
    module = factory().to(backend)
    traced = torch.jit.trace(module, randn(4, features, device=backend))  # check_trace=True
    for batch in (4, 5, 9):
        x = randn(batch, features, device=backend, scale=2.0).requires_grad_(True)
        y = traced(x)
        assert_close_to_ref(y, ref(module, x.detach()), what=f"traced forward, batch {batch}")
        g = randn(*y.shape, device=backend)
        y.backward(g)
        x64 = x.detach().double().requires_grad_(True)
        ref(module, x64).backward(g.double())
        assert_close_to_ref(x.grad, x64.grad, what=f"traced input gradient, batch {batch}")


def test_traced_halving_holds_k_as_a_constant_and_says_so(backend):
    """FixedHiddenMLP traced: a fastlayers TracerWarning names the limitation; the graph
    (torch's ops) is bitwise the seed's block and loop for inputs with the traced count,
    and (as the traced seed loop does) keeps that count for an input whose own count
    differs."""
    torch.manual_seed(3)
    module = fastlayers.FixedHiddenMLP(6).to(backend)

    def seed(x):  # the seed's forward in plain torch: (y, its loop count)
        with torch.no_grad():
            h = torch.relu(torch.mm(module.linear(x), module.rand_weight) + 1)
            return halve_until_loop(module.linear(h))

    x = randn(3, 6, device=backend, scale=3.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        traced = torch.jit.trace(module, x)
    ours = [w for w in seen if "fastlayers.halve_until under torch.jit.trace" in str(w.message)]
    assert ours and all(issubclass(w.category, torch.jit.TracerWarning) for w in ours)
    _, k = seed(x)
    for scale in (1.0, 1.0 + 2.0 ** -20):  # the same count
        y, k_same = seed(x * scale)
        assert k_same == k and torch.equal(traced(x * scale), y)
    big = x * 2.0 ** 12  # a larger |y| sum: the loop halves more often
    y_big, k_big = seed(big)
    assert k_big != k
    assert not torch.equal(traced(big), y_big), "a baked count cannot follow the input"


def test_traced_halving_of_a_relu_output(backend):
    """Exact zeros (a ReLU output) take the host route's least-nonzero search, which under
    the tracer avoids dtype views (TorchScript cannot record them): the traced function is
    the seed's loop, bitwise, at the traced input."""
    x = randn(5, 7, device=backend, scale=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda v: fastlayers.functional.halve_until(torch.relu(v)), x)
    y, _ = halve_until_loop(torch.relu(x))
    assert torch.equal(traced(x), y)


SCRIPTED = {
    "LinearReLU": lambda: fastlayers.LinearReLU(3, 4),
    "LazyLinearReLU": lambda: fastlayers.LazyLinearReLU(4),
    "MyLinear": lambda: fastlayers.MyLinear(3, 4),
    "CenteredLayer": lambda: fastlayers.CenteredLayer(),
    "FixedHiddenMatmul": lambda: fastlayers.FixedHiddenMatmul(3, 4),
    "FixedHiddenMLP": lambda: fastlayers.FixedHiddenMLP(4),
    "NestMLP": lambda: fastlayers.NestMLP(),
    "MySequential": lambda: fastlayers.MySequential(torch.nn.Linear(3, 4), torch.nn.ReLU()),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(SCRIPTED))
def test_jit_script_is_refused_clearly(name):
    """torch.jit.script of a module, or of a model holding one: a RuntimeError naming the
    module and the alternatives (not TorchScript's error about a line of our code)."""
    for model in (SCRIPTED[name](), torch.nn.Sequential(torch.nn.Identity(), SCRIPTED[name]())):
        with pytest.raises(RuntimeError) as info:
            torch.jit.script(model)
        for word in (f"fastlayers.{name}", "torch.jit.script", "torch.jit.trace"):
            assert word in str(info.value), (word, str(info.value))
