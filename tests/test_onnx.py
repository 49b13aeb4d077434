"""ONNX export with both exporters (dynamo=True, torch's default, and the TorchScript
tracer dynamo=False): standard ONNX operators only, run in onnxruntime on NEW inputs (other
values, another batch size) against the eager module; the halving count is computed in the
graph from the input (never a constant); what cannot be exported faithfully is refused."""
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers import onnx_export
from fastlayers.tour import seed as _seed

from conftest import KERNEL_DEVICE, requires_triton

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run the model in onnxruntime")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")

EXPORTERS = [True, False]  # dynamo=True (default), dynamo=False
STANDARD_DOMAINS = {"", "ai.onnx"}


class WithCount(nn.Module):
    """Exports a FixedHiddenMLP's (output, k): the halving count becomes a graph output."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp.forward_with_count(x)


def _mlp_like(sizes=(11, 16, 8, 3)):
    """torchvision.ops.MLP's layout (Linear, ReLU, Dropout per hidden layer), then fuse()d."""
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.0)]
    layers += [nn.Linear(sizes[-2], sizes[-1]), nn.Dropout(0.0)]
    return fastlayers.fuse(nn.Sequential(*layers)).eval()


def _vgg_like():
    """VGG/AlexNet layout (conv features, Linear/ReLU/Dropout classifier), fuse()d."""
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten())
    classifier = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Dropout(),
                               nn.Linear(16, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 5))
    fused = fastlayers.fuse(nn.Sequential(features, classifier)).eval()
    assert isinstance(fused[1][0], fastlayers.LinearReLU)
    return fused


def _lazy():
    m = fastlayers.LazyLinearReLU(6)
    m(torch.randn(2, 9))  # materialise: becomes a LinearReLU
    return m


MODULES = {  # name -> (factory, input shape (batch first), op types the graph must hold)
    "LinearReLU": (lambda: fastlayers.LinearReLU(9, 7), (5, 9), {"Gemm", "Relu"}),
    "MyLinear": (lambda: fastlayers.MyLinear(9, 5), (5, 9), {"Relu"}),
    "CenteredLayer": (lambda: fastlayers.CenteredLayer(), (4, 7), {"ReduceMean", "Sub"}),
    "CenteredLayer-dim": (lambda: fastlayers.CenteredLayer(dim=-1), (4, 7),
                          {"ReduceMean", "Sub"}),
    "FixedHiddenMatmul": (lambda: fastlayers.FixedHiddenMatmul(9, 6), (4, 9),
                          {"MatMul", "Add", "Relu"}),
    "FixedHiddenMLP": (lambda: WithCount(fastlayers.FixedHiddenMLP(20)), (3, 20),
                       {"Gemm", "MatMul", "Relu", "ReduceSum", "Abs", "Log", "Ceil", "Pow"}),
    "FixedHiddenMLP-sum": (lambda: WithCount(fastlayers.FixedHiddenMLP(20, reduce="sum")),
                           (3, 20), {"Gemm", "MatMul", "Relu", "ReduceSum", "Abs"}),
    "NestMLP": (lambda: fastlayers.NestMLP(), (2, 20), {"Gemm", "Relu"}),
    "MySequential": (lambda: fastlayers.MySequential(
        fastlayers.LinearReLU(9, 8), fastlayers.CenteredLayer(), nn.Linear(8, 3)), (5, 9),
        {"Gemm", "Relu", "ReduceMean", "Sub"}),
    "fuse(MLP)": (_mlp_like, (6, 11), {"Gemm", "Relu"}),
    "fuse(NestMLP)": (lambda: fastlayers.fuse(_seed.NestMLPEager()), (2, 20), {"Gemm", "Relu"}),
    "fuse(VGG)": (_vgg_like, (2, 3, 8, 8), {"Conv", "MaxPool", "Gemm", "Relu"}),
    "LazyLinearReLU": (_lazy, (3, 9), {"Gemm", "Relu"}),
}


class Zoo(nn.Module):
    """Every module of MODULES side by side, one input each (one export per exporter: the
    dynamo exporter costs seconds per call on a 2-core CPU)."""

    def __init__(self):
        super().__init__()
        self.names = list(MODULES)
        self.mods = nn.ModuleList([MODULES[n][0]() for n in self.names])

    def forward(self, *xs):
        outs = []
        for m, x in zip(self.mods, xs):
            o = m(x)
            outs += list(o) if isinstance(o, tuple) else [o]
        return tuple(outs)


def export(module, xs, path, dynamo):
    """Export with dim 0 of every input dynamic (a Zoo takes them as ``*xs``)."""
    if dynamo:
        shapes = tuple({0: torch.export.Dim(f"n{i}")} for i in range(len(xs)))
        torch.onnx.export(module, tuple(xs), path, dynamo=True, verbose=False,
                          dynamic_shapes=(shapes,) if isinstance(module, Zoo) else shapes)
    else:
        names = [f"x{i}" for i in range(len(xs))]
        torch.onnx.export(module, tuple(xs), path, dynamo=False, input_names=names,
                          dynamic_axes={n: {0: "n" + n} for n in names})
    model = onnx.load(path)
    onnx.checker.check_model(model)
    return model


def run(path, xs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert len(inputs) == len(xs), "the graph must take every input (not a constant)"
    return [torch.from_numpy(o) for o in session.run(None, {i.name: x.numpy()
                                                          for i, x in zip(inputs, xs)})]


def _op_types(model):
    nodes = list(model.graph.node)
    for f in model.functions:
        nodes += list(f.node)
    return {n.op_type for n in nodes}, {n.domain for n in nodes}


@pytest.fixture(scope="module", params=EXPORTERS, ids=["dynamo", "torchscript"])
def zoo(request, tmp_path_factory):
    """(the Zoo in eval mode, its exported file, the ONNX model), per exporter."""
    torch.manual_seed(0)
    module = Zoo().eval()
    path = tmp_path_factory.mktemp("onnx") / "zoo.onnx"
    xs = [torch.randn(*MODULES[n][1]) for n in module.names]
    return module, path, export(module, xs, path, request.param)


def test_zoo_graph_is_standard_onnx(zoo):
    _module, _path, model = zoo
    ops, domains = _op_types(model)
    assert domains <= STANDARD_DOMAINS, f"non-standard ops in the graph: {domains}"
    assert set().union(*(m[2] for m in MODULES.values())) - {"Gemm"} <= ops
    assert ops & {"Gemm", "MatMul"}
    assert len(model.graph.input) == len(MODULES)


@pytest.mark.parametrize("name", list(MODULES))
def test_each_module_alone_has_the_expected_ops(tmp_path, name, backend):
    """One module per graph (the TorchScript exporter: fast): its own operators, whichever
    path the op would take in eager (the kernel path checks for export in ops/<op>.py)."""
    factory, shape, must_have = MODULES[name]
    model = export(factory().eval().to(backend), [torch.randn(*shape, device=backend)],
                   tmp_path / "m.onnx", False)
    ops, domains = _op_types(model)
    assert domains <= STANDARD_DOMAINS and must_have <= ops, (ops, domains)


@requires_triton
@pytest.mark.parametrize("name", ["LinearReLU", "CenteredLayer"])
def test_dynamo_export_from_the_kernel_path_has_standard_ops(tmp_path, name):
    """The dynamo exporter traces the kernel path as eager would take it: the export check
    in ops/<op>.py must give torch's ops there (not the custom op)."""
    factory, shape, must_have = MODULES[name]
    with fastlayers.use_backend("triton"):
        model = export(factory().eval().to(KERNEL_DEVICE), [torch.randn(*shape).to(KERNEL_DEVICE)],
                       tmp_path / "m.onnx", True)
    ops, domains = _op_types(model)
    assert domains <= STANDARD_DOMAINS and must_have <= ops, (ops, domains)


def test_zoo_runs_in_onnxruntime_on_new_inputs(zoo, backend):
    """Other values and other batch sizes than the export's; eager on both paths."""
    module, path, _model = zoo
    module = module.to(backend)
    counts = set()
    for scale, grow in ((3.0, 1), (40.0, 2), (1e-3, 3)):
        xs = [torch.randn(MODULES[n][1][0] * grow + 1, *MODULES[n][1][1:]) * scale
              for n in module.names]
        got = run(path, xs)
        with torch.no_grad():
            want = [w.cpu() for w in module(*[x.to(backend) for x in xs])]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if w.dtype == torch.int32:  # a halving count: exact, from the input
                assert int(g) == int(w)
                counts.add(int(g))
            else:
                torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-5 * scale)
    assert len(counts) >= 3  # the count follows the input (was one baked-in Constant)


def seed_loop(x, threshold=1.0):
    """The seed's loop, literally, with its count."""
    x, k = x.clone(), 0
    while x.abs().sum() > threshold:
        x /= 2
        k += 1
    return x, k


def _halving_inputs():
    g = torch.Generator().manual_seed(7)
    cases = [torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]),
             torch.tensor([1.0]), torch.tensor([-3.0, 0.0, 1.0]), torch.zeros(3),
             torch.tensor([1.5, -2.5, 0.25])]
    for e in (-20, -3, 0, 1, 5, 17, 40, 100):
        cases.append(torch.randn(13, generator=g) * 2.0 ** e)
    cases.append(torch.randn(3, 5, generator=g) * 7)
    return cases


THRESHOLDS = (1.0, 0.3, 1000.0)


class Halvings(nn.Module):
    """fastlayers.functional.halve_until's (y, k) for each of THRESHOLDS."""

    def forward(self, x):
        return tuple(v for t in THRESHOLDS
                     for v in fastlayers.functional.halve_until(x, t, return_count=True))


@pytest.fixture(scope="module", params=EXPORTERS, ids=["dynamo", "torchscript"])
def halvings(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "halve.onnx"
    export(Halvings(), [torch.randn(4)], path, request.param)
    return path


def test_exported_halving_equals_the_loop_bitwise(halvings):
    for x in _halving_inputs():
        x = x.reshape(-1)
        got = run(halvings, [x])
        for i, threshold in enumerate(THRESHOLDS):
            want_y, want_k = seed_loop(x, threshold)
            assert int(got[2 * i + 1]) == want_k, (x, threshold)
            assert torch.equal(got[2 * i], want_y) and got[2 * i].dtype == torch.float32


def test_exported_halving_nan_and_inf(halvings):
    x = torch.tensor([3.0, float("nan"), -5.0])  # the loop stops at once
    y, k = run(halvings, [x])[:2]
    assert int(k) == 0 and torch.equal(y.nan_to_num(7.0), x.nan_to_num(7.0))
    x = torch.tensor([3.0, float("-inf"), -5.0])  # the loop never ends: its limit
    y, k = run(halvings, [x])[:2]
    assert int(k) == onnx_export.K_FOREVER
    assert torch.equal(y, torch.tensor([0.0, float("-inf"), -0.0]))
    assert torch.signbit(y[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_halve_until_for_export_equals_the_loop_in_torch(dtype):
    """The export formulation, run in torch, is bitwise the seed's loop (same reduction)."""
    g = torch.Generator().manual_seed(3)
    xs = [x.to(dtype) for x in _halving_inputs()]
    big = torch.finfo(dtype).max / 4
    xs.append(torch.full((8,), big, dtype=dtype))  # the first sum overflows: the loop goes on
    xs.append((torch.rand(100, generator=g) + 0.5).to(dtype) * big)
    for threshold in (1.0, 0.3, 5e3):
        for x in xs:
            y, k = onnx_export.halve_until_for_export(x, threshold)
            want_y, want_k = seed_loop(x, threshold)
            assert int(k) == want_k and torch.equal(y, want_y), (x, threshold)


def test_exporting_flag_is_set_by_both_exporters_only(tmp_path):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(onnx_export.exporting())
            return x + 1

    assert not onnx_export.exporting()
    torch.onnx.export(Probe(), (torch.randn(2),), tmp_path / "a.onnx", dynamo=True,
                      verbose=False)
    torch.onnx.export(Probe(), (torch.randn(2),), tmp_path / "b.onnx", dynamo=False)
    assert seen and all(seen)
    assert not onnx_export.exporting()
    seen.clear()
    torch.export.export(Probe(), (torch.randn(2),))  # not an ONNX export: the custom ops
    assert seen and not any(seen)


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["dynamo", "torchscript"])
def test_float16_halving_is_refused(tmp_path, dynamo):
    mlp = fastlayers.FixedHiddenMLP(8, dtype=torch.float16)
    with pytest.raises(Exception, match="float16"):
        torch.onnx.export(mlp, (torch.randn(2, 8, dtype=torch.float16),),
                          tmp_path / "m.onnx", dynamo=dynamo)


@pytest.mark.parametrize("threshold, error", [(-1.0, ValueError), (float("nan"), ValueError),
                                              (1e-40, ValueError), (torch.tensor(1.0), TypeError)])
def test_export_time_halving_checks_the_threshold(threshold, error):
    x = torch.randn(5)
    with pytest.raises(error, match="threshold"):
        onnx_export.halve_until(x, threshold)
    with pytest.raises(error, match="threshold"):
        onnx_export.fixed_hidden_mlp(x.reshape(1, 5), torch.randn(5, 5), None,
                                     torch.rand(5, 5), 1.0, threshold)
