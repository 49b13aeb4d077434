"""Input checks and layouts of every op, on both paths: bad arguments are refused with a
message naming the problem; awkward layouts (transposed leading dims that need ``reshape``,
offset views with a non-zero storage offset for every tensor argument, forward and
backward) give the float64 reference's answer."""
import pytest
import torch
import torch.nn.functional as F
from _util import assert_close_to_ref, randn

import fastlayers.functional as FL


def _args(device, d=6, batch=(4,), dtype=torch.float32):
    return dict(x=randn(*batch, d, device=device, dtype=dtype),
                weight=randn(d, d, device=device, dtype=dtype, scale=0.4),
                bias=randn(d, device=device, dtype=dtype),
                rand_weight=torch.rand(d, d, device=device, dtype=dtype))


# ------------------------------------------------------------------------ refused inputs
def _refused(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def test_bias_of_shape_1_by_n_is_refused(backend):
    a = _args(backend)
    _refused(lambda: FL.linear_relu(a["x"], a["weight"], a["bias"][None, :]), ValueError,
             "bias", "(1, 6)")
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], a["bias"][None, :], a["rand_weight"]),
             ValueError, "bias", "(1, 6)")


def test_zero_dim_input_is_refused(backend):
    a = _args(backend)
    x0 = torch.tensor(1.5, device=backend)
    _refused(lambda: FL.linear_relu(x0, a["weight"][:1], a["bias"][:1]), ValueError, "input", "()")
    _refused(lambda: FL.fixed_hidden(x0, a["rand_weight"][:1]), ValueError, "input", "()")
    _refused(lambda: FL.fixed_hidden_mlp(x0, a["weight"][:1, :1], a["bias"][:1],
                                         a["rand_weight"][:1, :1]), ValueError, "input", "()")


@pytest.mark.parametrize("other", ["dtype", "device"])
def test_bias_of_another_dtype_or_device_is_refused(backend, other):
    a = _args(backend)
    bias = a["bias"].double() if other == "dtype" else a["bias"].to("meta")
    word = "float64" if other == "dtype" else "meta"
    _refused(lambda: FL.linear_relu(a["x"], a["weight"], bias), (TypeError, RuntimeError),
             "bias", word)
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], bias, a["rand_weight"]),
             (TypeError, RuntimeError), "bias", word)


@pytest.mark.parametrize("shape", [(6,), (1, 6, 6)])
def test_weight_must_be_2d(backend, shape):
    a = _args(backend)
    w = torch.randn(shape, device=backend)
    _refused(lambda: FL.linear_relu(a["x"], w, None), ValueError, "weight", "2-D")
    _refused(lambda: FL.fixed_hidden(a["x"], w), ValueError, "weight", "2-D")


@pytest.mark.parametrize("bias", [0.5, [0.5] * 6, "bias", torch.arange(6)])
def test_bias_must_be_a_float_tensor(backend, bias):
    a = _args(backend)
    if isinstance(bias, torch.Tensor):
        bias = bias.to(backend)
    _refused(lambda: FL.linear_relu(a["x"], a["weight"], bias), TypeError, "bias")
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], bias, a["rand_weight"]),
             TypeError, "bias")


@pytest.mark.parametrize("c", [True, False, "1.0", None, torch.tensor(1.0)])
def test_c_must_be_a_python_number(backend, c):
    a = _args(backend)
    _refused(lambda: FL.fixed_hidden(a["x"], a["rand_weight"], c), TypeError, "c must be")
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], a["bias"], a["rand_weight"], c=c),
             TypeError, "c must be")


def test_int_c_is_accepted_as_float(backend):
    a = _args(backend)
    y = FL.fixed_hidden(a["x"], a["rand_weight"], 2)
    assert_close_to_ref(y, torch.relu(a["x"].double() @ a["rand_weight"].double() + 2))


@pytest.mark.parametrize("reduce", ["mean", "SUM", 0, True])
def test_fixed_hidden_mlp_reduce_must_be_none_or_sum(backend, reduce):
    a = _args(backend)
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], a["bias"], a["rand_weight"],
                                         reduce=reduce), ValueError, "reduce must be None or 'sum'")


def test_frozen_weight_that_requires_grad_is_refused(backend):
    a = _args(backend)
    rw = a["rand_weight"].clone().requires_grad_()
    _refused(lambda: FL.fixed_hidden(a["x"], rw), ValueError, "weight", "requires grad")
    _refused(lambda: FL.fixed_hidden_mlp(a["x"], a["weight"], a["bias"], rw), ValueError,
             "rand_weight", "detach")


# ------------------------------------------------------------------------ layouts
def _lin64(x, w, b):
    return F.linear(x, w, b)


def _refs(name, t):
    """float64 reference of op ``name`` on the tensors ``t`` (autograd leaves)."""
    x, w, b, r = t["x"], t.get("weight"), t.get("bias"), t.get("rand_weight")
    if name == "linear_relu":
        return torch.relu(_lin64(x, w, b))
    if name == "fixed_hidden":
        return torch.relu(x @ r + 0.5)
    if name == "fixed_hidden_mlp":
        y = _lin64(torch.relu(_lin64(x, w, b) @ r + 0.5), w, b)
        k = 0
        while y.detach().abs().sum() > 1:
            y, k = y / 2, k + 1
        return y
    if name == "centered":
        return x - x.mean(-1, keepdim=True)
    if name == "centered_all":
        return x - x.mean()
    if name == "halve_until":
        y = x
        while y.detach().abs().sum() > 1:
            y = y / 2
        return y
    raise AssertionError(name)


def _call(name, t):
    if name == "linear_relu":
        return FL.linear_relu(t["x"], t["weight"], t["bias"])
    if name == "fixed_hidden":
        return FL.fixed_hidden(t["x"], t["rand_weight"], 0.5)
    if name == "fixed_hidden_mlp":
        return FL.fixed_hidden_mlp(t["x"], t["weight"], t["bias"], t["rand_weight"], c=0.5)
    if name == "centered":
        return FL.centered(t["x"], -1)
    if name == "centered_all":
        return FL.centered(t["x"])
    if name == "halve_until":
        return FL.halve_until(t["x"])
    raise AssertionError(name)


ARGS = {"linear_relu": ["x", "weight", "bias"], "fixed_hidden": ["x", "rand_weight"],
        "fixed_hidden_mlp": ["x", "weight", "bias", "rand_weight"], "centered": ["x"],
        "centered_all": ["x"], "halve_until": ["x"]}
TRAINABLE = {"x", "weight", "bias"}


def _offset_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` that lives at a non-zero storage offset of a larger storage:
    'offset' (contiguous after the offset), 'offset_strided' (rows further apart) or
    'offset_transposed' (last two dims swapped in memory)."""
    if layout == "offset" or t.dim() < 2:
        big = torch.randn(t.numel() + 5, dtype=t.dtype, device=t.device)
        v = big[3:3 + t.numel()].view(t.shape)
    elif layout == "offset_strided":
        big = torch.randn(*t.shape[:-1], t.shape[-1] + 4, dtype=t.dtype, device=t.device)
        v = big.view(-1)[2:].as_strided(t.shape, big.stride(), 2)
    else:  # offset_transposed
        big = torch.randn(*t.shape[:-2], t.shape[-1] + 1, t.shape[-2], dtype=t.dtype,
                          device=t.device)
        v = big[..., 1:, :].transpose(-1, -2)
    v.copy_(t)
    assert v.storage_offset() > 0 and torch.equal(v, t)
    return v


def _run_layout(name, device, place, layout, batch=(5,)):
    t = _args(device, d=7, batch=batch)
    t["x"] = t["x"] * 3  # centered/halve: sums above the threshold
    ours = {}
    for k in ARGS[name]:
        v = _offset_view(t[k], layout) if k == place else t[k].clone()
        if k in TRAINABLE:
            v = v.detach().requires_grad_()  # a leaf that is still the offset view
        ours[k] = v
    ref = {k: v.detach().double().cpu().requires_grad_(k in TRAINABLE) for k, v in ours.items()}
    if place in ours:
        assert ours[place].storage_offset() > 0
    y = _call(name, ours)
    y_ref = _refs(name, ref)
    assert_close_to_ref(y, y_ref, what=f"{name} forward ({place}: {layout})")
    grad_out = randn(*y.shape, device=device)
    if place == "grad_out":
        grad_out = _offset_view(grad_out, layout)
    leaves = [k for k in ARGS[name] if k in TRAINABLE]
    gs = torch.autograd.grad(y, [ours[k] for k in leaves], grad_out)
    gs_ref = torch.autograd.grad(y_ref, [ref[k] for k in leaves], grad_out.double().cpu())
    for k, g, g_ref in zip(leaves, gs, gs_ref):
        assert_close_to_ref(g, g_ref, what=f"{name} grad {k} ({place}: {layout})")


@pytest.mark.parametrize("layout", ["offset", "offset_strided", "offset_transposed"])
@pytest.mark.parametrize("name,place", [(n, p) for n, a in ARGS.items() for p in a + ["grad_out"]])
def test_offset_views_of_every_argument(backend, name, place, layout):
    _run_layout(name, backend, place, layout)


@pytest.mark.parametrize("name", list(ARGS))
def test_transposed_3d_input_needs_reshape(backend, name):
    """A [2, 5, 7] input whose first two dims are swapped in memory: flattening the leading
    dims needs a copy (``view`` would raise)."""
    t = _args(backend, d=7, batch=(2, 5))
    x = (t["x"] * 3).transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(RuntimeError):
        x.view(-1, 7)
    t["x"] = x.requires_grad_()
    ref = {k: v.detach().double().cpu().requires_grad_(k in TRAINABLE) for k, v in t.items()}
    y = _call(name, t)
    y_ref = _refs(name, ref)
    assert y.shape == x.shape[:-1] + y_ref.shape[-1:]
    assert_close_to_ref(y, y_ref, what=f"{name} forward")
    grad_out = randn(*y.shape, device=backend)
    (g,) = torch.autograd.grad(y, t["x"], grad_out)
    (g_ref,) = torch.autograd.grad(y_ref, ref["x"], grad_out.double().cpu())
    assert_close_to_ref(g, g_ref, what=f"{name} grad x")


@pytest.mark.parametrize("layout", ["offset", "offset_transposed"])
def test_centered_3d_offset_view_over_inner_dims(backend, layout):
    """centered over the middle dim and over all dims of an offset 3-D view."""
    x = _offset_view(randn(3, 4, 5, device=backend), layout).requires_grad_()
    for dim in (1, None, (0, 2)):
        y = FL.centered(x, dim)
        xr = x.detach().double().cpu().requires_grad_()
        y_ref = xr - (xr.mean() if dim is None else xr.mean(dim, keepdim=True))
        assert_close_to_ref(y, y_ref, what=f"centered dim={dim}")
        gy = randn(3, 4, 5, device=backend)
        (g,) = torch.autograd.grad(y, x, gy)
        (g_ref,) = torch.autograd.grad(y_ref, xr, gy.double())
        assert_close_to_ref(g, g_ref, what=f"centered grad dim={dim}")
