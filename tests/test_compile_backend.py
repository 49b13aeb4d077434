"""torch.compile(model, backend="fastlayers") on unmodified plain-torch models: the same
outputs and gradients as eager torch (float64 oracle and fp32 eager), the expected fusions
in the report, the custom ops in the compiled graphs, dynamic shapes, autocast, the fp32
precision switches and the Triton kernels (interpreter on CPU)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastlayers
from fastlayers.compile_backend import backend
from fastlayers.tour.seed import FixedHiddenMLP, NestMLP  # the seed's, verbatim

from conftest import KERNEL_DEVICE, requires_triton


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # many tests compile nn.Sequential.forward: stay under the cache limit
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------- models, in plain torch only
class VGGLike(nn.Module):
    """torchvision.models.VGG's shape, tiny: conv features, pooling, Flatten, and the
    Linear/ReLU(inplace)/Dropout classifier (eval mode in the tests)."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(32, 13), nn.ReLU(True), nn.Dropout(),
            nn.Linear(13, 11), nn.ReLU(True), nn.Dropout(),
            nn.Linear(11, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def torchvision_mlp(in_channels, hidden_channels, norm_layer=None, dropout=0.0):
    """torchvision.ops.MLP, in plain torch: [Linear, (norm), ReLU, Dropout] per hidden
    layer, then Linear, Dropout."""
    layers, width = [], in_channels
    for hidden in hidden_channels[:-1]:
        layers.append(nn.Linear(width, hidden))
        if norm_layer is not None:
            layers.append(norm_layer(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    layers += [nn.Linear(width, hidden_channels[-1]), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def chimera():
    return nn.Sequential(NestMLP(), nn.LazyLinear(20), FixedHiddenMLP())


# ------------------------------------------------------------------------------ helpers
def _to64(model):
    m64 = copy.deepcopy(model).double()
    for mod in m64.modules():  # plain tensor attributes (the seed's rand_weight) too
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                setattr(mod, name, value.double())
    return m64


def _run(model, x, loss):
    """(outputs, grads of every parameter and of x) for loss(model(x))."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss(out).backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    if isinstance(out, tuple):
        return tuple(o.detach() for o in out), grads
    return out.detach(), grads


def _weighted_sum(out):
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * w).sum()


def check_against_eager(model, x, b, fullgraph=True, loss=_weighted_sum, tol=2e-5):
    """Compiled model vs eager fp32 (closely) and eager float64 (the oracle)."""
    model(x)  # materialize Lazy modules eagerly
    m64 = _to64(model)
    keys = list(model.state_dict())
    compiled = torch.compile(model, backend=b, fullgraph=fullgraph)
    out_c, g_c = _run(compiled, x, loss)
    out_e, g_e = _run(model, x, loss)
    out_64, g_64 = _run(m64, x.double(), loss)
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol)  # dtypes and shapes too
    as64 = tuple(o.double() for o in out_c) if isinstance(out_c, tuple) else out_c.double()
    torch.testing.assert_close(as64, out_64, rtol=10 * tol, atol=10 * tol)
    assert len(g_c) == len(g_e) == len(g_64)
    for gc, ge, g64 in zip(g_c, g_e, g_64):
        torch.testing.assert_close(gc, ge, rtol=tol, atol=tol)
        torch.testing.assert_close(gc.double(), g64, rtol=10 * tol, atol=10 * tol)
    assert list(model.state_dict()) == keys  # the user's module is untouched
    return out_c


# --------------------------------------------------------------------------------- tests
def test_vgg_like_classifier_fuses_its_linear_relus():
    model = VGGLike().eval()
    b = backend(inner="aot_eager")
    check_against_eager(model, torch.randn(3, 3, 8, 8), b)
    assert b.report.counts() == {"linear_relu": 2, "centered": 0, "fixed_hidden": 0}
    assert [f.modules for f in b.report.fusions] == [("classifier.0", "classifier.1"),
                                                      ("classifier.3", "classifier.4")]
    assert all(f.location.startswith(__file__) for f in b.report.fusions)


@pytest.mark.parametrize("shape", [(7, 19), (2, 3, 19), (1, 19)])
def test_torchvision_mlp(shape):
    model = torchvision_mlp(19, [17, 13, 5]).eval()
    b = backend(inner="aot_eager")
    check_against_eager(model, torch.randn(shape), b)
    assert b.report.counts()["linear_relu"] == 2


def test_mlp_with_a_norm_between_linear_and_relu_is_not_fused():
    model = torchvision_mlp(11, [7, 3], norm_layer=nn.LayerNorm)
    b = backend(inner="aot_eager")
    check_against_eager(model, torch.randn(5, 11), b)
    assert b.report.counts()["linear_relu"] == 0


def test_nest_mlp():
    b = backend(inner="aot_eager")
    check_against_eager(NestMLP(), torch.rand(2, 20), b)
    assert b.report.counts() == {"linear_relu": 2, "centered": 0, "fixed_hidden": 0}


def test_chimera_with_the_seeds_while_loop():
    """The halving loop breaks the graph (data-dependent control flow); the graphs
    around it still fuse NestMLP's two Linear+ReLU and FixedHiddenMLP's relu(X @ W + 1)."""
    model = chimera()
    b = backend(inner="aot_eager")
    x = torch.rand(2, 20) * 3
    check_against_eager(model, x, b, fullgraph=False, loss=lambda out: out * 1.5)
    counts = b.report.counts()
    assert counts == {"linear_relu": 2, "centered": 0, "fixed_hidden": 1}, b.report


def test_named_backend_with_inductor_trains_like_eager():
    """backend="fastlayers" resolves through the torch_dynamo_backends entry point and
    hands the rewritten graph to Inductor: SGD steps on batches of changing size
    (dynamic=True) match eager torch's."""
    from fastlayers.compile_backend import fastlayers_backend
    fastlayers_backend.report.clear()
    torch.manual_seed(1)
    model = torchvision_mlp(13, [11, 7, 3])
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fastlayers", fullgraph=True, dynamic=True)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    for rows in (6, 9, 2):  # dynamic batch: one graph for every size
        x, target = torch.randn(rows, 13), torch.randn(rows, 3)
        for m, o in ((compiled, opt), (twin, opt_twin)):
            o.zero_grad()
            F.mse_loss(m(x), target).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    report = fastlayers_backend.report
    # Dynamo may hand over the first call twice (seen here: once with the float arguments
    # as 0-d graph inputs, once specialized):
    # each graph it hands over fuses both Linear+ReLU pairs.
    assert report.graphs >= 1 and report.counts()["linear_relu"] == 2 * report.graphs


def _graph_capture():
    """An inner backend that records the aot_autograd forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return graphs, aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@requires_triton
def test_compiled_graphs_call_the_custom_ops_forward_and_backward():
    """On the kernel path (a GPU, or the interpreter here) the fused pair is the custom op,
    forward and backward; on the torch path it is torch's own ops, which Inductor fuses."""
    graphs, inner = _graph_capture()
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(KERNEL_DEVICE)
    x = torch.randn(4, 5, requires_grad=True, device=KERNEL_DEVICE)
    with fastlayers.use_backend("triton"):
        out = torch.compile(model, backend=backend(inner=inner))(x)
    out.sum().backward()
    fwd, bwd = (_targets(g) for g in graphs)
    assert "fastlayers.linear_relu_fwd.default" in fwd
    assert "aten.relu.default" not in fwd
    assert {"fastlayers.linear_relu_bwd_input.default",
            "fastlayers.linear_relu_bwd_params.default"} <= bwd


@pytest.mark.parametrize("precision, mode", [("highest", "ieee"), ("high", "tf32")])
@requires_triton
def test_fp32_precision_switch_reaches_the_fused_op(precision, mode):
    """The matmul precision in force when compiling is the one the op gets, and changing
    it recompiles (Dynamo guards on it), as for torch's own matmuls (kernel path)."""
    graphs, inner = _graph_capture()
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU()).to(KERNEL_DEVICE)
    before = torch.get_float32_matmul_precision()
    compiled = torch.compile(model, backend=backend(inner=inner))
    try:
        with fastlayers.use_backend("triton"):
            compiled(torch.randn(3, 5, device=KERNEL_DEVICE))  # at the default ('highest')
            torch.set_float32_matmul_precision(precision)
            compiled(torch.randn(3, 5, device=KERNEL_DEVICE))
    finally:
        torch.set_float32_matmul_precision(before)
    modes = [n.args[3] for g in graphs for n in g.graph.nodes
             if str(n.target) == "fastlayers.linear_relu_fwd.default"]
    assert modes[0] == "ieee" and modes[-1] == mode
    assert len(modes) == (1 if precision == before else 2)


def test_dynamic_shapes_compile_once():
    model = NestMLP()
    b = backend(inner="aot_eager")
    model(torch.rand(2, 20))
    compiled = torch.compile(model, backend=b, dynamic=True, fullgraph=True)
    for rows in (3, 5, 11):
        x = torch.randn(rows, 20)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert b.report.graphs == 1 and b.report.counts()["linear_relu"] == 2
    empty = torch.randn(0, 20)  # Dynamo specializes size 0: a second graph, same result
    torch.testing.assert_close(compiled(empty), model(empty))


class _AutocastModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(9, 7)
        self.w = nn.Parameter(torch.randn(9, 5))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = F.relu(self.fc(x))  # F.linear: autocast casts x, W and b -> fused in bf16
        return h, torch.relu(x @ self.w + self.b)  # bf16 mm + fp32 bias = fp32: left alone


def test_autocast_keeps_eager_dtypes_and_values():
    model = _AutocastModel()
    b = backend(inner="aot_eager")
    compiled = torch.compile(model, backend=b, fullgraph=True)
    x = torch.randn(6, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), model(x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert got[1].dtype == want[1].dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert b.report.counts()["linear_relu"] == 1
    assert any("autocast" in r for r in b.report.reasons("linear_relu"))


class _AllPatterns(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.register_buffer("frozen", torch.randn(5, 4))

    def forward(self, x):
        h = F.relu(self.fc(x))
        h = torch.relu(h @ self.frozen + 0.5)
        return h - h.mean(-1, keepdim=True), h - h.mean()


@requires_triton
def test_triton_kernels_run_inside_the_compiled_graph(monkeypatch):
    """Under use_backend('triton') the fused ops run the Triton kernels (the interpreter
    on CPU) from inside the Inductor-compiled graph: spy on the launchers, compare to
    float64 and eager fp32, forward and backward."""
    from fastlayers.kernels import centered as k_centered
    from fastlayers.kernels import linear_relu as k_linear_relu
    calls = []
    for mod, name in ((k_linear_relu, "linear_relu_fwd"), (k_linear_relu, "linear_relu_bwd_input"),
                      (k_centered, "centered")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k: (
            calls.append(_n), _real(*a, **k))[1])
    model = _AllPatterns()
    b = backend()  # Inductor around the custom ops
    with fastlayers.use_backend("triton"):
        outs = check_against_eager(model, torch.randn(3, 6), b,
                                   loss=lambda o: _weighted_sum(o[0]) + _weighted_sum(o[1]))
    assert {"linear_relu_fwd", "linear_relu_bwd_input", "centered"} <= set(calls)
    assert b.report.counts() == {"linear_relu": 1, "centered": 2, "fixed_hidden": 1}
    assert outs[0].shape == (3, 4)
