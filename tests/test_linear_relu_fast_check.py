"""The fast predicate of linear_relu (``_validate.linear_relu_ok``, what every call pays)
agrees with the full checks (``_validate.prepare_linear_relu``): it accepts only inputs
those accept unchanged, and whatever it refuses gets the full checks' error message (or
their autocast casts). No op runs for most cases: only validation is under test, on CPU
and meta tensors (a device mismatch in each position)."""
import pytest
import torch

from fastlayers import _validate
from fastlayers import functional as FL

from _util import randn


def _cases():
    """(name, thunk returning (x, weight, bias)) for good and bad argument sets."""
    def make(x_shape=(3, 5), w_shape=(4, 5), b_shape=(4,), dtypes=(torch.float32,) * 3,
             devices=("cpu",) * 3, bias=True):
        def build():
            x = randn(x_shape, dtype=dtypes[0]).to(devices[0])
            w = randn(w_shape, dtype=dtypes[1]).to(devices[1])
            b = randn(b_shape, dtype=dtypes[2]).to(devices[2]) if bias else None
            return x, w, b
        return build
    f32, f64, f16 = torch.float32, torch.float64, torch.float16
    yield "good", make()
    yield "good_no_bias", make(bias=False)
    yield "good_1d_x", make(x_shape=(5,))
    yield "good_3d_x", make(x_shape=(2, 3, 5))
    yield "good_empty_batch", make(x_shape=(0, 5))
    yield "good_float64", make(dtypes=(f64,) * 3)
    yield "good_all_meta", make(devices=("meta",) * 3)
    yield "x_0d", make(x_shape=())
    yield "in_features_differ", make(x_shape=(3, 6))
    yield "weight_1d", make(w_shape=(5,))
    yield "weight_3d", make(w_shape=(1, 4, 5))
    yield "bias_wrong_length", make(b_shape=(3,))
    yield "bias_broadcastable", make(b_shape=(1,))
    yield "bias_2d", make(b_shape=(1, 4))
    yield "bias_0d", make(b_shape=())
    for i, name in enumerate(("x", "weight", "bias")):
        dt = [f32, f32, f32]
        dt[i] = f64
        yield f"{name}_float64", make(dtypes=tuple(dt))
        dt[i] = f16
        yield f"{name}_float16", make(dtypes=tuple(dt))
        dev = ["cpu", "cpu", "cpu"]
        dev[i] = "meta"
        yield f"{name}_on_meta", make(devices=tuple(dev))
        dev = ["meta", "meta", "meta"]
        dev[i] = "cpu"
        yield f"{name}_on_cpu_rest_meta", make(devices=tuple(dev))
    yield "x_int", lambda: (torch.arange(10).view(2, 5), randn(4, 5), randn(4))
    yield "weight_int", lambda: (randn(2, 5), torch.ones(4, 5, dtype=torch.int64), randn(4))
    yield "x_complex", lambda: (randn(2, 5).to(torch.complex64),
                                randn(4, 5).to(torch.complex64), None)
    yield "x_list", lambda: ([[1.0] * 5], randn(4, 5), randn(4))
    yield "weight_list", lambda: (randn(2, 5), [[1.0] * 5] * 4, None)
    yield "bias_list", lambda: (randn(2, 5), randn(4, 5), [1.0] * 4)


CASES = list(_cases())


def _full_check(x, w, b):
    """("ok", None) when the full checks pass the arguments through unchanged, else
    ("error", (type, message)) or ("cast", None)."""
    try:
        out = _validate.prepare_linear_relu(x, w, b)
    except Exception as exc:  # noqa: BLE001 (the type and message are compared)
        return "error", (type(exc), str(exc))
    return ("ok" if all(o is i for o, i in zip(out, (x, w, b))) else "cast"), None


@pytest.mark.parametrize("name, build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_fast_predicate_agrees_with_full_checks(name, build, autocast):
    x, w, b = build()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast(
        "cpu", enabled=False)
    with ctx:
        fast = _validate.linear_relu_ok(x, w, b)
        verdict, err = _full_check(x, w, b)
        if fast:  # accepted: the full checks must accept it as is
            assert verdict == "ok", (name, verdict, err)
        assert not (autocast and fast), "autocast must take the full path (it casts)"
        if name.startswith("good") and not autocast:
            assert fast, f"{name}: the common case must take the fast path"
        if verdict == "error":  # the call raises exactly what the full checks raise
            with pytest.raises(err[0]) as info:
                FL.linear_relu(x, w, b)
            assert str(info.value) == err[1]
