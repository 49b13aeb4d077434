"""The seed's FixedHiddenMLP as one op: custom ops ``fastlayers::fixed_mlp_{fwd,bwd}`` and
:class:`FixedMLPFunction` (2-D input; the functional wrapper validates and reshapes).

fwd(x, W, b, R, c, threshold, reduce_sum, save_h2) -> (out, k, h2):
    y = L(relu(L(x) @ R + c)), L(v) = v @ W.T + b (one Linear used twice), then the
    halving loop on y (k halvings, see ``fastlayers.ops.halve_until``); out = the halved
    y, or its sum for reduce_sum (the seed's ``X.sum()``). h2 is kept for the backward.
bwd(grad_out, x, W, R, h2, k, reduce_sum) -> (grad_x, grad_W, grad_b), with
    dL/dy = grad_out * 2**-k (broadcast for reduce_sum): k is constant almost everywhere.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._backend import fp32_matmul_mode, use_triton
from .._validate import autocast_dtype, check_float, check_same
from . import halve_until as _halve
from ._dispatch import call, eager, needs_grad

try:
    from fastlayers.kernels import fixed_mlp as kernels
except ImportError:  # no triton: use_triton() is then always False
    kernels = None


def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], rand_weight: Tensor, c: float,
         threshold: float, reduce_sum: bool, save_h2: bool,
         fp32_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    if use_triton(x):
        t = _halve.threshold_in(x.dtype, threshold)
        return kernels.fixed_mlp_fwd(x, weight, bias, rand_weight, c, t, reduce_sum, save_h2,
                                     fp32_mode)
    y, h2 = reference.fixed_mlp_body(x, weight, bias, rand_weight, c)
    y, k = _halve._impl(y, threshold)
    return (y.sum() if reduce_sum else y), k, (h2 if save_h2 else h2.new_empty((0,)))


def _bwd(grad_out: Tensor, x: Tensor, weight: Tensor, rand_weight: Tensor, h2: Tensor,
         k: Tensor, reduce_sum: bool, fp32_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    grad_y = _halve.scale_grad(grad_out, k)
    if reduce_sum:
        grad_y = grad_y.expand(x.shape[0], weight.shape[0])
    if use_triton(grad_y):
        return kernels.fixed_mlp_bwd(grad_y, x, weight, rand_weight, h2, fp32_mode)
    return reference.fixed_mlp_bwd(grad_y, x, weight, rand_weight, h2)


fwd_op = torch.library.custom_op("fastlayers::fixed_mlp_fwd", _fwd, mutates_args=())
bwd_op = torch.library.custom_op("fastlayers::fixed_mlp_bwd", _bwd, mutates_args=())


@fwd_op.register_fake
def _(x, weight, bias, rand_weight, c, threshold, reduce_sum, save_h2, fp32_mode):
    out = x.new_empty(()) if reduce_sum else x.new_empty((x.shape[0], weight.shape[0]))
    h2 = x.new_empty((x.shape[0], weight.shape[0]) if save_h2 else (0,))
    return out, x.new_empty((), dtype=torch.int32), h2


@bwd_op.register_fake
def _(grad_out, x, weight, rand_weight, h2, k, reduce_sum, fp32_mode):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(
        (weight.shape[0],))


def _save(ctx, inputs, k, h2):
    x, weight, _bias, rand_weight, _c, _t, reduce_sum, save_h2, fp32_mode = inputs
    ctx.reduce_sum, ctx.fp32_mode, ctx.save_h2 = reduce_sum, fp32_mode, save_h2
    ctx.save_for_backward(x, weight, rand_weight, h2, k)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_out, _grad_k=None, _grad_h2=None):
    x, weight, rand_weight, h2, k = ctx.saved_tensors
    if not ctx.save_h2:
        raise RuntimeError("fastlayers::fixed_mlp_fwd: differentiate a call made with "
                           "save_h2=True (the backward needs the hidden activation)")
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x or need_w or need_b:
        grad_x, grad_w, grad_b = call(bwd_op, _bwd, grad_out, x, weight, rand_weight, h2, k,
                                      ctx.reduce_sum, ctx.fp32_mode)
    return (grad_x if need_x else None, grad_w if need_w else None,
            grad_b if need_b else None, None, None, None, None, None, None)


class FixedMLPFunction(torch.autograd.Function):
    """(out, k) of the seed's FixedHiddenMLP; gradients for x, weight and bias (the
    rand_weight is frozen). Arguments as ``fastlayers::fixed_mlp_fwd`` less save_h2."""

    @staticmethod
    def forward(ctx, x, weight, bias, rand_weight, c, threshold, reduce_sum, fp32_mode):
        args = (x, weight, bias, rand_weight, c, threshold, reduce_sum, True, fp32_mode)
        out, k, h2 = call(fwd_op, _fwd, *args)
        _save(ctx, args, k, h2)
        ctx.mark_non_differentiable(k)
        return out, k

    @staticmethod
    def backward(ctx, grad_out, _grad_k):
        return _backward(ctx, grad_out)[:8]


fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- entry point
def fixed_hidden_mlp(x, weight, bias, rand_weight, c=1.0, threshold=1.0, reduce=None,
                     return_count=False):
    """See :func:`fastlayers.functional.fixed_hidden_mlp`."""
    opname = "fixed_hidden_mlp"
    for name, t in (("input", x), ("weight", weight), ("rand_weight", rand_weight),
                    ("bias", bias)):
        if t is not None:
            check_float(opname, name, t)
    if reduce not in (None, "sum"):
        raise ValueError(f"{opname}: reduce must be None or 'sum', got {reduce!r}")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"{opname}: weight must be square [d, d] (one Linear(d, d) is used "
                         f"twice), got shape {tuple(weight.shape)}")
    d = weight.shape[0]
    if rand_weight.shape != (d, d):
        raise ValueError(f"{opname}: rand_weight must have shape ({d}, {d}) to match weight, "
                         f"got {tuple(rand_weight.shape)}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"{opname}: bias must have shape ({d},), got {tuple(bias.shape)}")
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{opname}: input has shape {tuple(x.shape)}, but the layer expects "
                         f"in_features={d} in the last dim")
    if rand_weight.requires_grad:
        raise ValueError(f"{opname}: rand_weight is frozen (the seed creates it with "
                         f"requires_grad=False); pass rand_weight.detach()")
    if not isinstance(c, (int, float)) or isinstance(c, bool):
        raise TypeError(f"{opname}: c must be a Python float, got {type(c).__name__}")
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight, rand_weight = x.to(cast), weight.to(cast), rand_weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    check_same(opname, {"input": x, "weight": weight, "bias": bias,
                        "rand_weight": rand_weight})
    threshold = _halve.validate_threshold(opname, x.dtype, threshold)
    reduce_sum = reduce == "sum"

    if eager() and not use_triton(x):  # torch's own autograd for the matmuls
        y, _ = reference.fixed_mlp_body(x, weight, bias, rand_weight, float(c))
        y, k = _halve.halve_until(y, threshold, return_count=True)
        out = y.sum() if reduce_sum else y
    else:
        x2 = x.reshape(-1, d)
        args = (x2, weight, bias, rand_weight, float(c), threshold, reduce_sum,
                fp32_matmul_mode())
        if needs_grad(x2, weight, bias):
            out, k = FixedMLPFunction.apply(*args)
        else:
            out, k, _ = call(fwd_op, _fwd, *args[:-1], False, args[-1])
        if not reduce_sum:
            out = out.view(x.shape)
        _halve.raise_if_forever(opname, k)
    return (out, k) if return_count else out
