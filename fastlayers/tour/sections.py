"""The tour's sections, one per part of the seed, in the seed's order (see fastlayers.tour).

Each section builds the seed's plain-torch model (:mod:`fastlayers.tour.seed`) and the fastlayers
one under the same random seed (so lazy layers draw the same initial weights), runs both
on the tour's device (``torch.device`` context) and compares them with ``t.compare`` /
``t.expect``.
"""
import copy
import os
import tempfile

import torch
from torch import nn

import fastlayers
from fastlayers import init
from fastlayers import io as fio
from fastlayers.params import describe

from . import seed


def _seeded(build, X, rng_seed=0):
    """build() under ``torch.manual_seed(rng_seed)``, then one forward pass on X: (net, Y)."""
    torch.manual_seed(rng_seed)
    net = build()
    return net, net(X)


class FusedMLP(nn.Module):
    """The seed's MLP written with fastlayers: ``self.out(F.relu(self.hidden(X)))`` becomes
    ``self.out(self.hidden(X))`` with a fused hidden layer (same state_dict keys)."""

    def __init__(self):
        super().__init__()
        self.hidden = fastlayers.LazyLinearReLU(256)
        self.out = nn.LazyLinear(10)

    def forward(self, X):
        return self.out(self.hidden(X))


def _train(t, net, X, Y, steps, label):
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = ((net(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        t.progress(i + 1, steps, label)
    return torch.stack(losses)


# ---------------------------------------------------------------------------- sections
def layers_and_modules(t):
    X = torch.rand(2, 20)
    seq = lambda: nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))  # noqa: E731
    t.compare("net = Sequential(LazyLinear(256), ReLU(), LazyLinear(10))",
              lambda: _seeded(lambda: fastlayers.fuse(seq()), X)[1], lambda: _seeded(seq, X)[1])
    t.compare("the same with LazyLinearReLU(256), Identity(), LazyLinear(10)",
              lambda: _seeded(lambda: nn.Sequential(fastlayers.LazyLinearReLU(256), nn.Identity(),
                                                    nn.LazyLinear(10)), X)[1],
              lambda: _seeded(seq, X)[1])
    t.compare("class MLP: out(relu(hidden(X))) with a fused hidden layer",
              lambda: _seeded(FusedMLP, X)[1], lambda: _seeded(seed.MLP, X)[1])
    t.expect("MLP state_dict keys unchanged by fusing",
             lambda: list(_seeded(FusedMLP, X)[0].state_dict()) ==
             list(_seeded(seed.MLP, X)[0].state_dict()))
    t.show(_seeded(lambda: fastlayers.fuse(seq()), X)[0])

    steps, batch = (5, 64) if t.quick else (300, 1024)
    Xt, Yt = torch.randn(batch, 20), torch.randn(batch, 10)
    t.compare(f"{steps} SGD steps: fused and seed nets give the same losses",
              lambda: _train(t, _seeded(lambda: fastlayers.fuse(seq()), Xt)[0], Xt, Yt, steps,
                             "training fused"),
              lambda: _train(t, _seeded(seq, Xt)[0], Xt, Yt, steps, "training seed"), rtol=1e-4)
    _speed(t, seq)


def _speed(t, seq):
    """Forward time of the fused and the seed's net (warm medians; shown, not judged)."""
    batch, repeat = (1024, 10) if t.quick else (4096, 50)
    Xb = torch.rand(batch, 20)
    fused, plain = _seeded(lambda: fastlayers.fuse(seq()), Xb)[0], _seeded(seq, Xb)[0]
    with torch.no_grad():
        t.timing(f"forward, batch {batch}", lambda: fused(Xb), lambda: plain(Xb), repeat)


def custom_blocks(t):
    X = torch.rand(2, 20)
    seed_net = lambda: seed.MySequential(nn.LazyLinear(256), nn.ReLU(),  # noqa: E731
                                          nn.LazyLinear(10))
    t.compare("seed's MySequential(LazyLinear, ReLU, LazyLinear), fused by fastlayers.fuse",
              lambda: _seeded(lambda: fastlayers.fuse(seed_net()), X)[1],
              lambda: _seeded(seed_net, X)[1])
    ours = lambda: fastlayers.MySequential(fastlayers.LazyLinearReLU(256),  # noqa: E731
                                           nn.Identity(), nn.LazyLinear(10))
    t.compare("fastlayers.MySequential(LazyLinearReLU, Identity, LazyLinear)",
              lambda: _seeded(ours, X)[1], lambda: _seeded(seed_net, X)[1])
    net = _seeded(ours, X)[0]
    t.expect("indexing, len and iteration", lambda: len(net) == 3 and net[2] is list(net)[2])


def custom_forward(t):
    cls = fastlayers.FixedHiddenMLP
    batches = [2, 7] if t.quick else [2, 7, 4096, 65536]
    for batch in batches:
        X = torch.rand(batch, 20)
        seed_net = _seeded(seed.FixedHiddenMLP, X)[0]
        ours = cls.from_seed(seed_net, reduce="sum")  # the seed's linear and rand_weight
        t.compare(f"FixedHiddenMLP(reduce='sum'), batch {batch}: the halving loop's result",
                  lambda: ours(X), lambda: seed_net(X))
    with torch.no_grad():  # the last batch; the seed tests the sum once per halving (a GPU sync)
        t.timing(f"FixedHiddenMLP(reduce='sum') forward, batch {batch}", lambda: ours(X),
                 lambda: seed_net(X), 10 if t.quick else 20)
    t.expect("rand_weight is a buffer (moved by .to(), saved by state_dict)",
             lambda: "rand_weight" in dict(cls().named_buffers()) and
             "rand_weight" in cls().state_dict())


def nesting(t):
    X = torch.rand(2, 20)
    seed_chimera, y_seed = _seeded(seed.chimera, X)
    t.compare("seed's chimera, fused by fastlayers.fuse",
              lambda: fastlayers.fuse(seed_chimera)(X), lambda: seed_chimera(X))
    ours = nn.Sequential(fastlayers.NestMLP(), nn.Linear(16, 20),
                         fastlayers.FixedHiddenMLP(reduce="sum"))
    t.expect("NestMLP keeps the seed's state_dict keys",
             lambda: list(ours[0].state_dict()) == list(seed_chimera[0].state_dict()))
    # The seed's state_dict loads strictly (its FixedHiddenMLP has no rand_weight entry:
    # ours keeps its own), then the seed's rand_weight is carried over by hand.
    ours.load_state_dict(seed_chimera.state_dict(), strict=True)
    ours[2].rand_weight.copy_(seed_chimera[2].rand_weight)
    t.compare("chimera = Sequential(NestMLP(), Linear(16, 20), FixedHiddenMLP())",
              lambda: ours(X), lambda: seed_chimera(X))
    t.show(ours)


def custom_layers(t):
    x = torch.tensor([1.0, 2, 3, 4, 5])
    t.compare("CenteredLayer()(tensor([1., 2, 3, 4, 5]))",
              lambda: fastlayers.CenteredLayer()(x), lambda: seed.CenteredLayer()(x))
    X = torch.rand(4, 8)
    t.compare("Sequential(LazyLinear(128), CenteredLayer())(rand(4, 8))",
              lambda: _seeded(lambda: nn.Sequential(nn.LazyLinear(128),
                                                    fastlayers.CenteredLayer()), X)[1],
              lambda: _seeded(lambda: nn.Sequential(nn.LazyLinear(128),
                                                    seed.CenteredLayer()), X)[1])
    Y = _seeded(lambda: nn.Sequential(nn.LazyLinear(128), fastlayers.CenteredLayer()), X)[1]
    t.expect(f"its mean is ~0 ({Y.mean().item():.1e})", lambda: abs(Y.mean().item()) < 1e-5)

    def pair(cls, *args):
        torch.manual_seed(3)
        return cls(*args)
    t.compare("MyLinear(5, 3): the same randn weight [5, 3] and bias [3]",
              lambda: dict(pair(fastlayers.MyLinear, 5, 3).state_dict()),
              lambda: dict(pair(seed.MyLinear, 5, 3).state_dict()))
    X = torch.rand(2, 5)
    # Same math, but relu(X @ W + b) fused is one GEMM with a bias epilogue where the seed
    # runs matmul then add: equal up to fp32 rounding, not bitwise.
    t.compare("linear(torch.rand(2, 5))", lambda: pair(fastlayers.MyLinear, 5, 3)(X),
              lambda: pair(seed.MyLinear, 5, 3)(X), exact=False)
    X = torch.rand(2, 64)
    two = lambda cls: nn.Sequential(cls(64, 8), cls(8, 1))  # noqa: E731
    t.compare("Sequential(MyLinear(64, 8), MyLinear(8, 1))(rand(2, 64))",
              lambda: pair(two, fastlayers.MyLinear)(X), lambda: pair(two, seed.MyLinear)(X),
              exact=False)
    layer = fastlayers.MyLinear(5, 3)
    layer(torch.rand(2, 5)).sum().backward()
    t.expect("fastlayers.MyLinear trains (the seed's .data use blocks gradients)",
             lambda: layer.weight.grad is not None and layer.bias.grad is not None)


def parameter_access(t):
    X = torch.rand(size=(2, 4))
    seq = lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))  # noqa: E731
    seed_net = _seeded(seq, X)[0]
    net = fastlayers.fuse(seed_net)
    t.compare("net(X) on the fused copy", lambda: net(X), lambda: seed_net(X))
    t.compare("net[2].state_dict()", lambda: dict(net[2].state_dict()),
              lambda: dict(seed_net[2].state_dict()))
    t.compare("type(net[2].bias), net[2].bias.data",
              lambda: (type(net[2].bias).__name__, net[2].bias.data),
              lambda: (type(seed_net[2].bias).__name__, seed_net[2].bias.data))
    t.expect("net[2].weight.grad is None", lambda: net[2].weight.grad is None)
    t.compare("[(name, param.shape) for name, param in net.named_parameters()]",
              lambda: [(n, tuple(p.shape)) for n, p in net.named_parameters()],
              lambda: [(n, tuple(p.shape)) for n, p in seed_net.named_parameters()])
    t.compare("net.state_dict()['2.bias'].data", lambda: net.state_dict()["2.bias"].data,
              lambda: seed_net.state_dict()["2.bias"].data)
    t.show(describe(net))
    X = torch.rand(size=(2, 4))
    seed_rg = _seeded(seed.rgnet, X)[0]
    rgnet = fastlayers.fuse(seed_rg)
    t.compare("rgnet = Sequential(block2(), Linear(4, 1)) fused: rgnet(X)",
              lambda: rgnet(X), lambda: seed_rg(X))
    t.compare("rgnet[0][1][0].bias.data", lambda: rgnet[0][1][0].bias.data,
              lambda: seed_rg[0][1][0].bias.data)
    t.expect("rgnet[0][1][0] is a LinearReLU",
             lambda: isinstance(rgnet[0][1][0], fastlayers.LinearReLU))


def initialisation(t):
    X = torch.rand(2, 4)
    seq = lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))  # noqa: E731
    base = _seeded(seq, X)[0]

    def both(ours_init, seed_init, label):
        def run(net, fn):
            torch.manual_seed(42)
            fn(net)
            return dict(net.state_dict())
        t.compare(label, lambda: run(fastlayers.fuse(base), ours_init),
                  lambda: run(copy.deepcopy(base), seed_init), exact=True)
    both(lambda n: init.normal_(n, std=0.01), lambda n: n.apply(seed.init_normal),
         "init.normal_(net, std=0.01) == net.apply(init_normal)")
    both(lambda n: init.constant_(n, 1), lambda n: n.apply(seed.init_constant),
         "init.constant_(net, 1) == net.apply(init_constant)")
    both(lambda n: (init.xavier_uniform_(n[0], bias="keep"), init.constant_(n[2], 42, bias="keep")),
         lambda n: (n[0].apply(seed.init_xavier), n[2].apply(seed.init_42)),
         "xavier on net[0], 42 on net[2]")

    def my_init(m):  # the seed's my_init; init.apply hands it only linear-like layers
        nn.init.uniform_(m.weight, -10, 10)
        m.weight.data *= m.weight.data.abs() >= 5
    both(lambda n: init.apply(n, my_init), lambda n: n.apply(seed.my_init),
         "init.apply(net, my_init) == net.apply(my_init)")
    net = fastlayers.fuse(base)
    net[0].weight.data[:] += 1
    net[0].weight.data[0, 0] = 42
    t.expect("direct edits: net[0].weight.data[0, 0] = 42", lambda: net[0].weight.data[0, 0] == 42)


def tied_parameters(t):
    X = torch.rand(2, 4)
    seed_net = _seeded(seed.tied_net, X)[0]
    net = fastlayers.fuse(seed_net)
    t.compare("net(X) with the shared layer at net[2] and net[4]", lambda: net(X),
              lambda: seed_net(X))
    t.expect("net[2] is net[4] after fusing (one LinearReLU, one weight)",
             lambda: net[2] is net[4] and net[2].weight is net[4].weight)
    net[2].weight.data[0, 0] = 100
    t.expect("net[2].weight.data[0, 0] = 100 shows in net[4]",
             lambda: net[4].weight.data[0, 0] == 100)
    seed_net[2].weight.data[0, 0] = 100

    def grads(model):
        model.zero_grad()
        model(X).sum().backward()
        return model[2].weight.grad
    t.compare("the shared weight's gradient sums both uses", lambda: grads(net),
              lambda: grads(seed_net))


def lazy_initialisation(t):
    X = torch.rand(2, 20)
    net = nn.Sequential(fastlayers.LazyLinearReLU(256), nn.Identity(), nn.LazyLinear(10))
    seed_net = nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))
    t.expect("before: net[0].weight is an UninitializedParameter",
             lambda: isinstance(net[0].weight, nn.parameter.UninitializedParameter))
    t.show(net)

    def first_call(model):  # the weights are drawn now, at the first forward
        torch.manual_seed(0)
        return model(X)
    t.compare("net(X) materialises the layers (same draws as the seed)",
              lambda: first_call(net), lambda: first_call(seed_net))
    t.compare("after: net[0].weight.shape", lambda: tuple(net[0].weight.shape),
              lambda: tuple(seed_net[0].weight.shape))
    t.show(net)


def file_io(t):
    with tempfile.TemporaryDirectory(prefix="fastlayers-tour-") as tmp:
        path = lambda name: os.path.join(tmp, name)  # noqa: E731
        x, y = torch.arange(4), torch.zeros(4)
        for name, obj in (("x-file", x), ("x-files", [x, y]), ("mydict", {"x": x, "y": y})):
            def ours(name=name, obj=obj):
                fio.save(obj, path(name))
                return fio.load(path(name))
            t.compare(f"io.save / io.load {name}", ours, lambda obj=obj: obj, exact=True)
        X = torch.randn(size=(2, 20))
        for suffix in ("params", "safetensors"):
            net, Y = _seeded(seed.IoMLP, X)
            fio.save(net.state_dict(), path(f"mlp.{suffix}"))

            def clone_output(suffix=suffix):
                clone = fastlayers.fuse(seed.IoMLP())
                clone.load_state_dict(fio.load(path(f"mlp.{suffix}")))
                clone.eval()
                return clone(X)
            t.compare(f"mlp.{suffix}: a fused clone loads the state_dict, Y_clone == Y",
                      clone_output, lambda Y=Y: Y)
        hidden = nn.Linear(20, 256)
        fio.save_model(net.hidden, path("hidden.pth"))
        fio.load_model(hidden, path("hidden.pth"))
        t.compare("net.hidden.state_dict() alone", lambda: hidden.weight, lambda: net.hidden.weight)

        class Payload:
            def __reduce__(self):
                return (print, ("this would run code",))
        torch.save(Payload(), path("evil.pt"))

        def refused():
            try:
                fio.load(path("evil.pt"))
            except fio.UnsafeFileError:
                return True
            return False
        t.expect("a pickle that would run code is refused", refused)
        t.expect("no temporary files left behind",
                 lambda: sorted(os.listdir(tmp)) == sorted(
                     ["x-file", "x-files", "mydict", "mlp.params", "mlp.safetensors",
                      "hidden.pth", "evil.pt"]))


def gpus(t):
    t.compare("try_gpu(), try_gpu(10)", lambda: (fastlayers.device.try_gpu(),
                                                  fastlayers.device.try_gpu(10)),
              lambda: (seed.try_gpu(), seed.try_gpu(10)))
    t.compare("try_all_gpus(): the seed's GPUs, or [cpu] if none",
              lambda: fastlayers.device.try_all_gpus(),
              lambda: seed.try_all_gpus() or [torch.device("cpu")])
    X = torch.ones(2, 3, device=fastlayers.device.try_gpu())
    t.expect(f"X = torch.ones(2, 3, device=try_gpu()) is on {X.device}",
             lambda: X.device == fastlayers.device.try_gpu())
    with torch.device("cpu"):
        torch.manual_seed(0)
        cpu_net = fastlayers.fuse(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    X = torch.rand(2, 3, device="cpu")
    dev = fastlayers.device.try_gpu()
    moved = fastlayers.device.to_device(copy.deepcopy(cpu_net), dev)
    t.expect(f"net[0].weight.data.device after to_device is {dev}",
             lambda: moved[0].weight.data.device == dev)
    t.compare("net on try_gpu() computes what it computes on the CPU",
              lambda: moved(fastlayers.device.to_device(X, dev)).cpu(), lambda: cpu_net(X),
              exact=dev.type == "cpu")
    batch = fastlayers.device.to_device({"X": X, "rest": [X, (X,)]}, dev)
    t.expect("to_device moves nested containers", lambda: batch["rest"][1][0].device == dev)


SECTIONS = [
    ("layers", "Layers and modules", layers_and_modules),
    ("blocks", "Custom blocks: MySequential", custom_blocks),
    ("forward", "Custom forward: FixedHiddenMLP", custom_forward),
    ("nesting", "Nesting blocks: NestMLP and the chimera", nesting),
    ("custom_layers", "Custom layers: CenteredLayer and MyLinear", custom_layers),
    ("params", "Parameter access", parameter_access),
    ("init", "Parameter initialisation", initialisation),
    ("tied", "Tied parameters", tied_parameters),
    ("lazy", "Lazy initialisation", lazy_initialisation),
    ("io", "File I/O", file_io),
    ("gpu", "GPUs", gpus),
]
