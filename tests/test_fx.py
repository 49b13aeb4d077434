"""torch.fx: symbolic_trace of every fastlayers module (and of fuse()d models) records each
fastlayers op as one leaf call and gives the module's outputs and gradients; a hand-written
equivalent of torchvision's ``create_feature_extractor`` works on models holding fused layers."""
import pytest
import torch
import torch.fx
from torch import nn

import fastlayers
from fastlayers.tour import seed as _seed


def _modules():
    """name -> (module factory, input shape)."""
    def lazy():
        m = fastlayers.LazyLinearReLU(6)
        m(torch.randn(2, 9))  # materialise: becomes a LinearReLU
        return m

    return {
        "LinearReLU": (lambda: fastlayers.LinearReLU(9, 7), (5, 9)),
        "LinearReLU-nobias-3d": (lambda: fastlayers.LinearReLU(9, 7, bias=False), (2, 3, 9)),
        "LazyLinearReLU": (lazy, (4, 9)),
        "MyLinear": (lambda: fastlayers.MyLinear(9, 5), (3, 9)),
        "CenteredLayer": (lambda: fastlayers.CenteredLayer(), (3, 7)),
        "CenteredLayer-dim": (lambda: fastlayers.CenteredLayer(dim=-1), (3, 7)),
        "CenteredLayer-dims": (lambda: fastlayers.CenteredLayer(dim=(0, 2)), (2, 3, 5)),
        "FixedHiddenMatmul": (lambda: fastlayers.FixedHiddenMatmul(9, 6), (4, 9)),
        "FixedHiddenMLP": (lambda: fastlayers.FixedHiddenMLP(20), (3, 20)),
        "FixedHiddenMLP-sum": (lambda: fastlayers.FixedHiddenMLP(20, reduce="sum"), (3, 20)),
        "NestMLP": (lambda: fastlayers.NestMLP(), (2, 20)),
        "MySequential": (lambda: fastlayers.MySequential(
            fastlayers.LinearReLU(9, 8), fastlayers.CenteredLayer(), nn.Linear(8, 3)), (5, 9)),
        "fuse(NestMLP)": (lambda: fastlayers.fuse(_seed.NestMLPEager()), (2, 20)),
        "fuse(MySequential)": (lambda: fastlayers.fuse(_seed.MySequential(
            nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())), (3, 9)),
    }


MODULES = _modules()
FASTLAYERS_FNS = {"linear_relu", "centered", "fixed_hidden", "fixed_hidden_mlp"}


@pytest.mark.parametrize("name", list(MODULES))
def test_symbolic_trace_matches_module(backend, name):
    factory, shape = MODULES[name]
    module = factory().to(backend)
    traced = torch.fx.symbolic_trace(module)
    calls = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__module__", "") == "fastlayers.functional"]
    assert calls and set(calls) <= FASTLAYERS_FNS  # each fastlayers op is one leaf call

    x = torch.randn(*shape, device=backend).mul_(3)  # new values, not the tracing ones
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = module(x1), traced(x2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    # a different batch size: the traced graph holds no shape constants
    x3 = torch.randn(1, *shape[1:], device=backend)
    torch.testing.assert_close(traced(x3), module(x3), rtol=0, atol=0)


def test_traced_fused_model_matches_float64_plain_model(backend):
    plain = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))
    traced = torch.fx.symbolic_trace(fastlayers.fuse(plain).to(backend))
    x = torch.randn(7, 9)
    want = plain.double()(x.double())
    torch.testing.assert_close(traced(x.to(backend)).double().cpu(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ create_feature_extractor, written by hand
class _PathTracer(torch.fx.Tracer):
    """Records, for each node, the qualified name of the module whose forward created it
    (torchvision's NodePathTracer does the same)."""

    def __init__(self):
        super().__init__()
        self.path, self.node_path = "", {}

    def call_module(self, m, forward, args, kwargs):
        outer, self.path = self.path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.path = outer

    def create_proxy(self, *args, **kwargs):
        proxy = super().create_proxy(*args, **kwargs)
        self.node_path[proxy.node] = self.path
        return proxy


def create_feature_extractor(model, return_nodes):
    """A GraphModule returning {name: output of the module at that path} (the last node
    each named module produced), like torchvision.models.feature_extraction."""
    tracer = _PathTracer()
    graph = tracer.trace(model)
    last = {}
    for node in graph.nodes:
        path = tracer.node_path.get(node)
        if path is not None:
            for p in [path] + [path[:i] for i, ch in enumerate(path) if ch == "."]:
                last[p] = node
    missing = [n for n in return_nodes if n not in last]
    assert not missing, f"no node for {missing}; have {sorted(last)}"
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.output({n: last[n] for n in return_nodes})
    graph.erase_node(output)
    module = torch.fx.GraphModule(model, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


class TinyVGG(nn.Module):
    """VGG-style: conv features, then a Linear/ReLU/Dropout classifier (torchvision's layout)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(6 * 2 * 2, 16), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(16, 12), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(12, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_feature_extractor_on_fused_vgg(backend):
    plain = TinyVGG().eval()
    fused = fastlayers.fuse(plain).to(backend)
    assert isinstance(fused.classifier[0], fastlayers.LinearReLU)
    extractor = create_feature_extractor(fused, ["features", "classifier.0", "classifier.3",
                                                 "classifier"])
    x = torch.randn(3, 3, 8, 8)
    feats = extractor(x.to(backend))
    with torch.no_grad():  # independent float64 oracle: the plain model's own layers
        p = plain.double()
        f = p.features(x.double()).flatten(1)
        h0 = p.classifier[1](p.classifier[0](f))  # a fused slot returns post-ReLU values
        h3 = p.classifier[4](p.classifier[3](h0))
        want = {"features": p.features(x.double()), "classifier.0": h0, "classifier.3": h3,
                "classifier": p.classifier[6](h3)}
    assert set(feats) == set(want)
    for k in want:
        torch.testing.assert_close(feats[k].double().cpu(), want[k], rtol=1e-5, atol=1e-5)


def test_feature_extractor_inside_a_fastlayers_block(backend):
    model = fastlayers.NestMLP().to(backend)
    extractor = create_feature_extractor(model, ["net.0", "net.2", "linear"])
    x = torch.randn(4, 20, device=backend)
    feats = extractor(x)
    h0 = model.net[0](x)
    torch.testing.assert_close(feats["net.0"], h0, rtol=0, atol=0)
    torch.testing.assert_close(feats["net.2"], model.net[2](h0), rtol=0, atol=0)
    torch.testing.assert_close(feats["linear"], model(x), rtol=0, atol=0)
