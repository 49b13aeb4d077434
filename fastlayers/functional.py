"""Functional forms of the fused ops (the modules in ``fastlayers.layers`` call these).

Every function here does three things, in this order: hands FX proxies and tensor
subclasses to ``__torch_function__`` (so ``torch.fx.symbolic_trace`` records one leaf call),
validates its input (:mod:`fastlayers._validate`: clear errors naming shape, dtype and
device), and follows ``torch.autocast`` like the torch op it replaces. Then it calls the
op's entry point in ``fastlayers.ops.<op>``, the one place that chooses the Triton kernels
or the torch reference (see ``fastlayers.backend_info()``).
"""
import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _validate, onnx_export, settings
from ._validate import autocast_cast, check_same_place
from .ops import centered as _centered
from .ops import fixed_hidden as _fh
from .ops import fixed_hidden_mlp as _fmlp
from .ops import halve_until as _hu
from .ops import linear_relu as _lr


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor = None) -> Tensor:
    """relu(x @ weight.T + bias), fused into one kernel (forward and backward).

    x: [..., in_features], any number of leading dims (none too), any strides.
    weight: [out_features, in_features], as in nn.Linear. bias: [out_features] or None.
    Numerics: fp32 accumulation for every dtype, one rounding to x's dtype at the end;
    fp32 inputs follow torch's matmul precision switches (``'highest'``: fp32-accurate;
    ``'high'``/``'medium'``: TF32 allowed on CUDA). Under autocast, floating tensors other
    than float64 are cast to the autocast dtype first, as F.linear's would be.
    """
    if has_torch_function_variadic(x, weight, bias):  # FX proxies, tensor subclasses
        return handle_torch_function(linear_relu, (x, weight, bias), x, weight, bias)
    if not _validate.linear_relu_ok(x, weight, bias):  # the common case, checked fast
        x, weight, bias = _validate.prepare_linear_relu(x, weight, bias)
    return _lr.linear_relu(x, weight, bias)


def centered(x: Tensor, dim=None) -> Tensor:
    """x - x.mean() (dim=None, the seed's CenteredLayer) or x - x.mean(dim, keepdim=True).

    x: floating point, any rank (0-d too), any strides; empty gives empty. dim: None (all
    elements), an int or a tuple of ints (negative counts from the end; () means all).
    Numerics: the mean accumulates in fp32 and ``x - mean`` is computed in fp32, rounded
    once to x's dtype (float64 stays float64). Backward: dx = dy - mean(dy) over the same
    dims. Deterministic: the same input gives bitwise the same output.
    """
    if has_torch_function_variadic(x):
        return handle_torch_function(centered, (x,), x, dim)
    if not (isinstance(x, Tensor) and x.dtype.is_floating_point):  # the common case, fast
        _validate.check_float("centered", "input", x)
    dims = [] if dim is None else _centered.normalize_dims("centered", x.dim(), dim)
    return _centered.centered(x, dims)


# ---------------------------------------------------------------- fixed-hidden matmul, halving, MLP
def fixed_hidden(x: Tensor, weight: Tensor, c: float = 1.0) -> Tensor:
    """relu(x @ weight + c) with a frozen weight, fused into one kernel.

    x: [..., in_features], any leading dims and strides. weight: [in_features,
    out_features] (the seed's ``rand_weight`` layout), must not require grad (it is
    frozen: a clear error otherwise). c: a Python float, added in fp32 before the ReLU.
    Numerics as :func:`linear_relu`. Backward: for x only.
    """
    if has_torch_function_variadic(x, weight):
        return handle_torch_function(fixed_hidden, (x, weight), x, weight, c)
    c = _validate.check_fixed_hidden(x, weight, c)
    if torch._C._is_any_autocast_enabled():
        x, weight = autocast_cast(x.device.type, x, weight)
    check_same_place("fixed_hidden", {"input": x, "weight": weight})
    if onnx_export.exporting():
        return onnx_export.fixed_hidden(x, weight, c)
    return _fh.fixed_hidden(x, weight, c)


def halve_until(x: Tensor, threshold: float = 1.0, return_count: bool = False):
    """The seed's ``while x.abs().sum() > threshold: x /= 2`` as x halved k times, with k
    from one reduction and NO device-to-host sync (k stays in device memory).

    Returns y (x's shape and dtype), or (y, k) with return_count (k: int32 0-dim tensor on
    x's device). For every finite input y is bitwise the loop's result whenever both see
    the same |x|-sums: k from one reduction, plus the loop's sums at a few counts around it
    when elements reach the subnormal range (each halving of a subnormal rounds). The torch
    path uses torch's own sums (the same device gives the loop's count exactly; under
    torch.func.vmap each sample's sum in the loop's order for that sample); the
    Triton path its fp32 partial sums (another summation order: a sum within rounding of
    threshold * 2**j can differ), every S_j for fp16, and a window pass for fp32/bf16
    (see fastlayers.kernels.halve_until). The threshold is
    rounded to x's dtype as torch's comparison rounds it and must be >= the dtype's
    smallest normal number. A finite input whose fp32 |x|-sum overflows still gets the
    loop's answer. NaN in x: the loop stops at once, y = x, k = 0. ±inf in x: the loop
    never ends; we return its limit (finite elements -> signed zeros, ±inf kept, k =
    2**31 - 1), or raise ValueError under FASTLAYERS_CHECK=1 (eager only; it reads k on
    the host, a sync). Gradient: grad * 2**-k.
    """
    if has_torch_function_variadic(x):
        return handle_torch_function(halve_until, (x,), x, threshold, return_count)
    _validate.check_float("halve_until", "input", x)
    _validate.check_not_dtensor("halve_until", input=x)
    threshold = _validate.check_threshold("halve_until", x.dtype, threshold)
    if onnx_export.exporting():
        return onnx_export.halve_until(x, threshold, return_count)
    y, k = _hu.halve_until(x, threshold)
    _raise_if_forever("halve_until", k)
    return (y, k) if return_count else y


def fixed_hidden_mlp(x: Tensor, weight: Tensor, bias: Tensor, rand_weight: Tensor,
                     c: float = 1.0, threshold: float = 1.0, reduce=None,
                     return_count: bool = False):
    """The seed's FixedHiddenMLP forward: y = L(relu(L(x) @ rand_weight + c)) with ONE
    Linear L(v) = v @ weight.T + bias used twice, then :func:`halve_until` on y.

    x: [..., d]; weight [d, d]; bias [d] or None; rand_weight [d, d] (frozen). reduce:
    None (return the halved y) or 'sum' (its sum, the seed's ``X.sum()``). Returns out,
    or (out, k) with return_count. Triton path, d <= 64: one kernel for the three
    matmuls and the partial sums, then the count and scale kernels; larger d composes the
    fused GEMMs. Gradients for x, weight and bias (dL/dy = dL/dout * 2**-k).
    """
    if has_torch_function_variadic(x, weight, bias, rand_weight):
        return handle_torch_function(fixed_hidden_mlp, (x, weight, bias, rand_weight), x,
                                     weight, bias, rand_weight, c, threshold, reduce,
                                     return_count)
    op = "fixed_hidden_mlp"
    c = _validate.check_fixed_hidden_mlp(x, weight, bias, rand_weight, c, reduce)
    _validate.check_not_dtensor(op, input=x, weight=weight, bias=bias, rand_weight=rand_weight)
    if torch._C._is_any_autocast_enabled():
        x, weight, bias, rand_weight = autocast_cast(x.device.type, x, weight, bias,
                                                     rand_weight)
    check_same_place(op, {"input": x, "weight": weight, "bias": bias, "rand_weight": rand_weight})
    threshold = _validate.check_threshold(op, x.dtype, threshold)
    if onnx_export.exporting():
        return onnx_export.fixed_hidden_mlp(x, weight, bias, rand_weight, c, threshold, reduce,
                                            return_count)
    out, k = _fmlp.fixed_hidden_mlp(x, weight, bias, rand_weight, c, threshold,
                                    reduce == "sum")
    _raise_if_forever(op, k)
    return (out, k) if return_count else out


def _raise_if_forever(op: str, k: Tensor) -> None:
    """Under FASTLAYERS_CHECK=1 in eager mode: a clear error for an input holding ±inf
    (reads k on the host: a sync on CUDA)."""
    if settings.check and not torch.compiler.is_compiling() and int(k) == _hu.K_FOREVER:
        raise ValueError(
            f"{op}: the input holds ±inf, so the seed's loop `while x.abs().sum() > "
            f"threshold: x /= 2` would never end (FASTLAYERS_CHECK=1 turns this into an "
            f"error; without it the loop's limit is returned: finite elements become 0, "
            f"±inf stays)")
