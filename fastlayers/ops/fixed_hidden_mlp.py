"""The seed's FixedHiddenMLP as one op: custom ops ``fastlayers::fixed_hidden_mlp_{fwd,bwd}``,
:class:`FixedHiddenMLPFunction` and :func:`fixed_hidden_mlp`, the one place its path is chosen.

fwd(x, W, b, R, c, threshold, reduce_sum, save_h2) -> (out, k, h2):
    y = L(relu(L(x) @ R + c)), L(v) = v @ W.T + b (one Linear used twice), then the
    halving loop on y (k halvings, see ``fastlayers.ops.halve_until``); out = the halved
    y, or its sum for reduce_sum (the seed's ``X.sum()``). h2 is kept for the backward.
bwd(grad_out, x, W, R, h2, k, reduce_sum) -> (grad_x, grad_W, grad_b), with
    dL/dy = grad_out * 2**-k (broadcast for reduce_sum): k is constant almost everywhere.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._backend import (fp32_matmul_mode, get_backend, in_forward_backend, kernel_module,
                        use_triton)
from . import halve_until as _halve
from ._dispatch import call, needs_grad
from ._operands import checked, expect

kernels = kernel_module("fixed_hidden_mlp")


def _kernel_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], rand_weight: Tensor,
                c: float, threshold: float, reduce_sum: bool, save_h2: bool,
                fp32_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    t = _halve.threshold_in(x.dtype, threshold)
    window = _halve.window_below(x.shape[0] * weight.shape[0], x.dtype, t)
    return kernels.fixed_hidden_mlp_fwd(x, weight, bias, rand_weight, c, t, window,
                                        reduce_sum, save_h2, fp32_mode)


def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], rand_weight: Tensor, c: float,
         threshold: float, reduce_sum: bool, save_h2: bool,
         fp32_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    if use_triton(x):
        return _kernel_fwd(x, weight, bias, rand_weight, c, threshold, reduce_sum, save_h2,
                           fp32_mode)
    y, h2 = reference.fixed_hidden_mlp_body(x, weight, bias, rand_weight, c)
    y, k = _halve._impl(y, threshold)
    return (y.sum() if reduce_sum else y), k, (h2 if save_h2 else h2.new_empty((0,)))


def _bwd(grad_out: Tensor, x: Tensor, weight: Tensor, rand_weight: Tensor, h2: Tensor,
         k: Tensor, reduce_sum: bool, fp32_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    grad_y = _halve.scale_grad(grad_out, k)
    if reduce_sum:
        grad_y = grad_y.expand(x.shape[0], weight.shape[0])
    if use_triton(grad_y):
        return kernels.fixed_hidden_mlp_bwd(grad_y, x, weight, rand_weight, h2, fp32_mode)
    return reference.fixed_hidden_mlp_bwd(grad_y, x, weight, rand_weight, h2)


def _check_fwd(x, weight, bias, rand_weight, c, threshold, reduce_sum, save_h2, fp32_mode):
    expect("fastlayers::fixed_hidden_mlp_fwd", fp32_mode, x=(x, "MD"), weight=(weight, "DD"),
           bias=(bias, "D"), rand_weight=(rand_weight, "DD"))
    _halve.threshold_in(x.dtype, threshold)  # raises for a threshold the loop cannot use


def _check_bwd(grad_out, x, weight, rand_weight, h2, k, reduce_sum, fp32_mode):
    expect("fastlayers::fixed_hidden_mlp_bwd", fp32_mode,
           grad_out=(grad_out, "" if reduce_sum else "MD"), x=(x, "MD"),
           weight=(weight, "DD"), rand_weight=(rand_weight, "DD"), h2=(h2, "MD"))
    if k.shape != () or k.dtype != torch.int32:
        raise ValueError(f"fastlayers::fixed_hidden_mlp_bwd: k must be the forward's int32 "
                         f"0-dim count, got {k.dtype} {list(k.shape)}")


fwd_op = torch.library.custom_op("fastlayers::fixed_hidden_mlp_fwd", checked(_fwd, _check_fwd),
                                 mutates_args=())
bwd_op = torch.library.custom_op("fastlayers::fixed_hidden_mlp_bwd", checked(_bwd, _check_bwd),
                                 mutates_args=())


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
    x, weight, bias, rand_weight, c, _t, reduce_sum, save_h2, fp32_mode = inputs
    ctx.reduce_sum, ctx.fp32_mode, ctx.save_h2, ctx.c = reduce_sum, fp32_mode, save_h2, c
    ctx.backend = get_backend()
    ctx.save_for_backward(x, weight, bias, rand_weight, h2, k)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _differentiable_bwd(ctx, grad_out, x, weight, bias, rand_weight, k):
    """The backward as torch's composite, h2 recomputed with autograd, so that a gradient
    of the gradient (``create_graph=True``) sees how h2 depends on x, weight and bias."""
    _, h2 = reference.fixed_hidden_mlp_body(x, weight, bias, rand_weight, ctx.c)
    grad_y = _halve.scale_grad(grad_out, k)
    if ctx.reduce_sum:
        grad_y = grad_y.expand(x.shape[0], weight.shape[0])
    return reference.fixed_hidden_mlp_bwd(grad_y, x, weight, rand_weight, h2)


@in_forward_backend
def _backward(ctx, grad_out, _grad_k=None, _grad_h2=None):
    x, weight, bias, rand_weight, h2, k = ctx.saved_tensors
    if not ctx.save_h2:
        raise RuntimeError("fastlayers::fixed_hidden_mlp_fwd: differentiate a call made "
                           "with save_h2=True (the backward needs the hidden activation)")
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if torch.is_grad_enabled():
        grad_x, grad_w, grad_b = _differentiable_bwd(ctx, grad_out, x, weight, bias,
                                                     rand_weight, k)
    elif need_x or need_w or need_b:
        grad_x, grad_w, grad_b = call(bwd_op, _bwd, grad_out, x, weight, rand_weight, h2, k,
                                      ctx.reduce_sum, ctx.fp32_mode)
    return (grad_x if need_x else None, grad_w if need_w else None,
            grad_b if need_b else None, None, None, None, None, None, None)


class FixedHiddenMLPFunction(torch.autograd.Function):
    """(out, k) of the seed's FixedHiddenMLP; gradients for x, weight and bias (the
    rand_weight is frozen). Arguments as ``fastlayers::fixed_hidden_mlp_fwd`` less save_h2."""

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
def fixed_hidden_mlp(x: Tensor, weight: Tensor, bias: Optional[Tensor], rand_weight: Tensor,
                     c: float, threshold: float, reduce_sum: bool) -> Tuple[Tensor, Tensor]:
    """(out, k) for validated inputs: THE place its path is chosen. torch path: the
    reference body and ``halve_until`` with torch's autograd; kernel path: leading dims
    flattened, through :class:`FixedHiddenMLPFunction` when a gradient is needed."""
    if not use_triton(x, weight, bias, rand_weight):
        y, _ = reference.fixed_hidden_mlp_body(x, weight, bias, rand_weight, c)
        y, k = _halve.halve_until(y, threshold)
        return (y.sum() if reduce_sum else y), k
    x2 = x.reshape(math.prod(x.shape[:-1]), weight.shape[0])
    fp32_mode = fp32_matmul_mode()
    args = (x2, weight, bias, rand_weight, c, threshold, reduce_sum, fp32_mode)
    if needs_grad(x2, weight, bias):
        out, k = FixedHiddenMLPFunction.apply(*args)
    else:
        out, k, _ = call(fwd_op, _kernel_fwd, *args[:-1], False, fp32_mode)
    return (out if reduce_sum else out.view(x.shape)), k
