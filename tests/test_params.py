"""fastlayers.params.describe, and the seed's parameter accesses on fused models.
These helpers delegate to torch and launch no fastlayers op, so one path suffices; the
layers' own outputs are checked on both paths in test_parity_modules.py."""
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers.tour import seed as _seed
from fastlayers.params import ParamRow, describe


def _reference_rows(model):
    """(name, kind, shape, dtype, device, requires_grad, numel, has_grad) straight from torch."""
    rows = [(n, "parameter", tuple(p.shape), p.dtype, p.device, p.requires_grad, p.numel(),
             p.grad is not None) for n, p in model.named_parameters()]
    rows += [(n, "buffer", tuple(b.shape), b.dtype, b.device, False, b.numel(), False)
             for n, b in model.named_buffers()]
    return rows


def _as_tuple(r: ParamRow):
    return (r.name, r.kind, r.shape, r.dtype, r.device, r.requires_grad, r.numel, r.has_grad)


class WithBuffers(nn.Module):
    """Nested params and buffers of several dtypes, a frozen parameter, a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.body = fastlayers.fuse(_seed.rgnet())
        self.head = fastlayers.MyLinear(4, 3)
        self.register_buffer("fixed", torch.rand(4, 4, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(7))
        self.register_buffer("scratch", torch.zeros(5, dtype=torch.float16), persistent=False)
        self.frozen = nn.Parameter(torch.randn(2, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return self.head(self.body[0](x)) @ self.fixed[:3, :3].float()


def test_rows_match_torch_for_every_parameter_and_buffer():
    model = WithBuffers()
    rows = describe(model)
    assert [_as_tuple(r) for r in rows] == _reference_rows(model)
    assert rows.row("scratch").in_state_dict is False
    assert rows.row("fixed").in_state_dict and rows.row("fixed").kind == "buffer"
    assert {r.name for r in rows if r.in_state_dict} == set(model.state_dict())

    model(torch.randn(5, 4)).sum().backward()
    after = describe(model)
    assert [_as_tuple(r) for r in after] == _reference_rows(model)
    grads = {r.name: r.has_grad for r in after}
    assert grads["head.weight"] and grads["body.0.block 3.2.bias"]
    assert not grads["frozen"] and not grads["body.1.weight"]  # body[1] not in forward


def test_numel_totals_and_table_text():
    model = WithBuffers()
    rows = describe(model)
    assert rows.total_numel == sum(t.numel() for t in model.state_dict().values()) + 5
    assert rows.trainable_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = str(rows)
    assert repr(rows) == text
    for r in rows:
        assert r.name in text
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "shape"]
    assert len(lines) == len(rows) + 3
    assert "[8, 4]" in text and "bfloat16" in text and "not in state_dict" in text
    assert lines[-1].startswith(f"{len(rows)} tensors, {rows.total_numel:,} elements")


def test_tied_parameters_listed_under_every_name_counted_once():
    net = _seed.tied_net()
    net(torch.rand(2, 4))
    rows = describe(net)
    assert [r.name for r in rows] == [n for n, _ in net.named_parameters(remove_duplicate=False)]
    assert rows.row("4.weight").shared_with == "2.weight"
    assert rows.row("4.bias").shared_with == "2.bias"
    assert rows.row("2.weight").shared_with is None
    assert rows.total_numel == sum(p.numel() for p in net.parameters())  # torch dedups too


def test_lazy_and_meta_rows():
    net = nn.Sequential(fastlayers.LazyLinearReLU(8), nn.Identity(), nn.Linear(8, 2, device="meta"))
    rows = describe(net)
    assert rows.row("0.weight").shape is None and rows.row("0.weight").numel == 0
    assert "uninitialised" in rows.row("0.bias").note and "?" in str(rows)
    assert rows.row("2.weight").device == torch.device("meta")
    assert rows.row("2.weight").shape == (2, 8)


def test_fastlayers_blocks():
    chimera = nn.Sequential(fastlayers.NestMLP(), nn.Linear(16, 20),
                            fastlayers.FixedHiddenMLP(reduce="sum"))
    rows = describe(chimera)
    assert [_as_tuple(r) for r in rows] == _reference_rows(chimera)
    row = rows.row("2.rand_weight")
    assert row.kind == "buffer" and row.shape == (20, 20) and not row.requires_grad
    assert [r.name for r in rows if r.kind == "parameter"][:2] == ["0.net.0.weight", "0.net.0.bias"]


def test_errors_are_clear():
    with pytest.raises(TypeError, match="expected an nn.Module, got Tensor"):
        describe(torch.ones(2))
    with pytest.raises(KeyError, match="no parameter or buffer named 'nope'.*0.weight"):
        describe(nn.Sequential(nn.Linear(2, 2))).row("nope")


def test_seed_parameter_access_on_a_fused_net():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    net = fastlayers.fuse(plain)
    X = torch.rand(size=(2, 4))
    assert torch.equal(net(X), plain(X))
    assert isinstance(net[0], fastlayers.LinearReLU)
    sd = net[2].state_dict()
    assert list(sd) == ["weight", "bias"] and torch.equal(sd["bias"], plain[2].bias)
    assert type(net[2].bias) is nn.Parameter and torch.equal(net[2].bias.data, plain[2].bias.data)
    assert net[2].weight.grad is None
    assert [(n, p.shape) for n, p in net.named_parameters()] == \
        [("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (1, 8)), ("2.bias", (1,))]
    assert torch.equal(net.state_dict()["2.bias"].data, plain[2].bias.data)
    assert torch.equal(net.state_dict()["0.weight"], plain.state_dict()["0.weight"])
    net(X).sum().backward()
    assert net[0].weight.grad.shape == (8, 4) and describe(net).row("0.weight").has_grad


def test_seed_rgnet_access_on_a_fused_net():
    torch.manual_seed(0)
    rgnet = _seed.rgnet()
    fused = fastlayers.fuse(rgnet)
    X = torch.rand(2, 4)
    assert torch.equal(fused(X), rgnet(X))
    layer = fused[0][1][0]
    assert isinstance(layer, fastlayers.LinearReLU)
    assert torch.equal(layer.bias.data, rgnet[0][1][0].bias.data)
    text = str(fused)
    assert "(block 0): Sequential" in text and "LinearReLU(in_features=4, out_features=8" in text
    assert list(fused.state_dict()) == list(rgnet.state_dict())
    assert [r.name for r in describe(fused)] == list(rgnet.state_dict())
