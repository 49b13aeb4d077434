"""fastlayers.device: try_gpu / try_all_gpus, to_device on nested containers, and every
fastlayers layer after .to(device) (the 'meta' device here, CUDA on a GPU machine).
Device moves are path-independent (meta tensors take torch on every backend: checked in
test_parity_autograd.py); CUDA runs every layer on the kernels."""
from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Mapping
from types import MappingProxyType

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.tour import seed as _seed
from fastlayers.device import to_device, try_all_gpus, try_gpu

from conftest import HAS_CUDA


def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_try_gpu_and_try_all_gpus(monkeypatch, n):
    _fake_gpus(monkeypatch, n)
    cuda = [torch.device(f"cuda:{i}") for i in range(n)]
    assert try_all_gpus() == (cuda or [torch.device("cpu")])
    for i in range(4):
        assert try_gpu(i) == (cuda[i] if i < n else torch.device("cpu"))
        assert try_gpu(i) == _seed.try_gpu(i)  # the seed's definition
    assert try_gpu() == (cuda[0] if n else torch.device("cpu"))
    assert fastlayers.device.num_gpus() == n


@pytest.mark.parametrize("n", [0, 2])
def test_try_gpu_takes_any_integer_the_seed_takes(monkeypatch, n):
    """NumPy and 0-d tensor integers, as the seed's ``device_count() >= i + 1`` takes them."""
    import numpy as np
    _fake_gpus(monkeypatch, n)
    for i in (np.int64(1), np.int32(0), torch.tensor(1), torch.tensor(3, dtype=torch.int8)):
        assert try_gpu(i) == _seed.try_gpu(i) == try_gpu(int(i))


def test_try_gpu_rejects_bad_indices():
    import numpy as np
    for bad in (-1, 1.0, "0", True, np.float64(0), torch.tensor(0.5), torch.tensor([0.0]),
                np.int64(-2), None):
        with pytest.raises(ValueError, match="try_gpu: i must be a GPU index >= 0"):
            try_gpu(bad)


def test_this_machine():
    expected = torch.device("cuda:0") if HAS_CUDA else torch.device("cpu")
    assert try_gpu() == expected and try_all_gpus()[0] == expected


Pair = namedtuple("Pair", "first second")


def _on(obj, device_type):
    """Every tensor inside ``obj`` is on ``device_type``; returns how many there were."""
    if isinstance(obj, torch.Tensor):
        assert obj.device.type == device_type
        return 1
    if isinstance(obj, Mapping):
        return sum(_on(v, device_type) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_on(v, device_type) for v in obj)
    return 0


def test_to_device_moves_nested_containers_and_keeps_their_types():
    dd = defaultdict(list, {"a": torch.ones(2)})
    obj = {
        "x": torch.randn(3), "pair": Pair(torch.ones(1), [torch.zeros(2), 7, "text", None]),
        "ordered": OrderedDict(b=torch.ones(1), a=(torch.ones(2), 1.5)), "dd": dd,
        "proxy": MappingProxyType({"t": torch.ones(1)}),
    }
    moved = to_device(obj, "meta")
    assert _on(moved, "meta") == 7 and _on(obj, "cpu") == 7  # the original is untouched
    assert type(moved["pair"]) is Pair and moved["pair"].second[1:] == [7, "text", None]
    assert type(moved["ordered"]) is OrderedDict and list(moved["ordered"]) == ["b", "a"]
    assert type(moved["dd"]) is defaultdict and moved["dd"].default_factory is list
    assert moved["proxy"]["t"].device.type == "meta"
    assert to_device(5, "meta") == 5 and to_device("s", torch.device("meta")) == "s"


def test_centered_layer_follows_its_input():
    layer = fastlayers.CenteredLayer()
    x = torch.randn(3, 4)
    assert layer(x.to("meta")).device.type == "meta"
    assert torch.allclose(layer(x), x - x.mean())


def test_to_device_on_modules_and_tensors():
    net = nn.Sequential(fastlayers.LinearReLU(3, 4), nn.BatchNorm1d(4))
    assert to_device(net, "meta") is net  # in place, like Module.to
    assert all(t.device.type == "meta" for t in list(net.parameters()) + list(net.buffers()))
    x = torch.randn(2)
    assert to_device(x, "cpu") is x  # already there: no copy, like Tensor.to
    packed = nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    assert to_device(packed, "meta").data.device.type == "meta"


def _layers():
    """Every fastlayers layer (materialised), with an input of the right feature size."""
    lazy = fastlayers.LazyLinearReLU(5)
    lazy(torch.randn(1, 4))
    layers = {
        "LinearReLU": (fastlayers.LinearReLU(4, 6), 4),
        "LazyLinearReLU": (lazy, 4),
        "MyLinear": (fastlayers.MyLinear(4, 3), 4),
        "fused seq": (fastlayers.fuse(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))), 4),
        "FixedHiddenMatmul": (fastlayers.FixedHiddenMatmul(4, 6), 4),
        "FixedHiddenMLP": (fastlayers.FixedHiddenMLP(), 20),
        "FixedHiddenMLP sum": (fastlayers.FixedHiddenMLP(reduce="sum"), 20),
        "NestMLP": (fastlayers.NestMLP(), 20),
        "MySequential": (fastlayers.MySequential(fastlayers.LinearReLU(4, 5),
                                                 fastlayers.MyLinear(5, 2)), 4),
        "chimera": (nn.Sequential(fastlayers.NestMLP(), nn.Linear(16, 20),
                                  fastlayers.FixedHiddenMLP(reduce="sum")), 20),
    }
    return layers


LAYER_NAMES = list(_layers())


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_moves_with_its_buffers_and_refuses_foreign_inputs(name):
    layer, features = _layers()[name]
    state = layer.state_dict()
    moved = layer.to("meta")
    assert all(t.device.type == "meta" for t in moved.state_dict().values())
    assert all(t.device.type == "meta" for t in list(moved.parameters()) + list(moved.buffers()))
    assert set(moved.state_dict()) == set(state)
    with pytest.raises((RuntimeError, ValueError), match=r"(?s)(meta.*cpu|cpu.*meta)"):
        moved(torch.randn(3, features))


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_runs_on_the_meta_device(name):
    layer, features = _layers()[name]
    x = torch.randn(3, features)
    y = layer(x)
    out = layer.to("meta")(x.to("meta"))
    assert out.device.type == "meta" and out.shape == y.shape and out.dtype == y.dtype


@pytest.mark.cuda
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_on_cuda_matches_cpu(name):
    torch.manual_seed(0)
    layer, features = _layers()[name]
    x = torch.randn(33, features)
    y_cpu = layer(x)
    gpu = to_device(layer, try_gpu())
    assert all(t.is_cuda for t in gpu.state_dict().values())
    y_gpu = gpu(to_device(x, "cuda"))
    assert y_gpu.is_cuda
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=2e-3, atol=2e-3)  # TF32 may be on
    with pytest.raises((RuntimeError, ValueError), match=r"(?s)(cuda.*cpu|cpu.*cuda)"):
        gpu(x)


@pytest.mark.cuda
def test_to_device_round_trip_on_cuda():
    obj = {"a": [torch.randn(2), (torch.ones(3),)]}
    back = to_device(to_device(obj, try_gpu()), "cpu")
    assert torch.equal(back["a"][0], obj["a"][0]) and torch.equal(back["a"][1][0], obj["a"][1][0])
    assert try_all_gpus() == [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
