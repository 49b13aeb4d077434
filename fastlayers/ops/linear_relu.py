"""Linear + bias + ReLU: custom ops ``fastlayers::linear_relu_{fwd,bwd_input,bwd_params}``,
:class:`LinearReLUFunction`, and :func:`linear_relu`, the one place its path is chosen."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import onnx_export, reference
from .._backend import (fp32_matmul_mode, get_backend, in_forward_backend, kernel_module,
                        use_triton)
from ._dispatch import call, needs_grad
from ._operands import checked, expect

kernels = kernel_module("linear_relu")


# Implementations of the registered ops (what torch.compile, export and dispatch modes
# run): each picks by the same rule as :func:`linear_relu`.
def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], fp32_mode: str) -> Tensor:
    if use_triton(x):
        return kernels.linear_relu_fwd(x, weight, bias, fp32_mode)
    return reference.linear_relu(x, weight, bias)


def _bwd_input(grad_out: Tensor, out: Tensor, weight: Tensor, fp32_mode: str) -> Tensor:
    if use_triton(grad_out):
        return kernels.linear_relu_bwd_input(grad_out, out, weight, fp32_mode)
    return reference.linear_relu_bwd_input(grad_out, out, weight)


def _bwd_params(grad_out: Tensor, out: Tensor, x: Tensor, fp32_mode: str) -> Tuple[Tensor, Tensor]:
    if use_triton(grad_out):
        return kernels.linear_relu_bwd_params(grad_out, out, x, fp32_mode)
    return reference.linear_relu_bwd_params(grad_out, out, x)


fwd_op = torch.library.custom_op("fastlayers::linear_relu_fwd", checked(
    _fwd, lambda x, w, b, mode: expect("fastlayers::linear_relu_fwd", mode, x=(x, "MK"),
                                       weight=(w, "NK"), bias=(b, "N"))), mutates_args=())
bwd_input_op = torch.library.custom_op("fastlayers::linear_relu_bwd_input", checked(
    _bwd_input, lambda g, out, w, mode: expect("fastlayers::linear_relu_bwd_input", mode,
                                               grad_out=(g, "MN"), out=(out, "MN"),
                                               weight=(w, "NK"))), mutates_args=())
bwd_params_op = torch.library.custom_op("fastlayers::linear_relu_bwd_params", checked(
    _bwd_params, lambda g, out, x, mode: expect("fastlayers::linear_relu_bwd_params", mode,
                                                grad_out=(g, "MN"), out=(out, "MN"),
                                                x=(x, "MK"))), mutates_args=())


@fwd_op.register_fake
def _(x, weight, bias, fp32_mode):
    return x.new_empty((x.shape[0], weight.shape[0]))


@bwd_input_op.register_fake
def _(grad_out, out, weight, fp32_mode):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@bwd_params_op.register_fake
def _(grad_out, out, x, fp32_mode):
    return grad_out.new_empty((grad_out.shape[1], x.shape[1])), grad_out.new_empty(grad_out.shape[1])


def _setup_context(ctx, inputs, output):
    """Save only what backward needs: the output always (its sign is the ReLU mask),
    x only if weight needs a gradient, weight only if x does."""
    x, weight, _bias, fp32_mode = inputs
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.fp32_mode, ctx.backend = fp32_mode, get_backend()
    ctx.save_for_backward(x if need_w else None, weight if need_x else None, output)


@in_forward_backend
def _backward(ctx, grad_out):
    """Kernels for a plain backward (on the forward's backend); torch's differentiable
    composite of the same formulas when the gradient itself is differentiated
    (``create_graph=True``: grad mode is on)."""
    x, weight, out = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    differentiable = torch.is_grad_enabled()
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = (reference.linear_relu_bwd_input(grad_out, out, weight) if differentiable
                  else call(bwd_input_op, _bwd_input, grad_out, out, weight, ctx.fp32_mode))
    if need_w:
        grad_w, grad_b = (reference.linear_relu_bwd_params(grad_out, out, x) if differentiable
                          else call(bwd_params_op, _bwd_params, grad_out, out, x, ctx.fp32_mode))
    elif need_b:  # frozen weight, trainable bias: a plain reduction
        grad_b = reference.relu_grad(grad_out, out).sum(0)
    return grad_x, grad_w, grad_b if need_b else None, None


class LinearReLUFunction(torch.autograd.Function):
    """y = relu(x @ weight.T + bias) for x [M, K], weight [N, K], bias [N] or None, on the
    kernels. Twice differentiable (the second order through torch's composite).

    forward takes ``ctx`` (no separate setup_context): torch binds arguments through
    ``inspect.signature`` on every call of a setup_context-style Function, which costs more
    than a small layer's whole forward. torch.func transforms never reach it: under them
    :func:`fastlayers._backend.use_triton` sends the op to torch's own ops. Its forward
    asks the rule again (the op's implementation), so a direct call is right for any
    dtype (the float64 gradchecks of the backward formulas call it so).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fp32_mode):
        out = call(fwd_op, _fwd, x, weight, bias, fp32_mode)
        _setup_context(ctx, (x, weight, bias, fp32_mode), out)
        return out

    backward = staticmethod(_backward)


# The forward op is differentiable on its own too (torch.ops.fastlayers.linear_relu_fwd),
# with the same formula as the autograd Function.
fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """relu(x @ weight.T + bias) for validated x [..., K]: THE place its path is chosen.

    torch path (and ONNX export): torch's own ops and autograd (N-D as is; the export
    check only runs on the kernel path, so the CPU call pays nothing). Kernel path:
    leading dims flattened to M rows (``reshape``, so any strides), through
    :class:`LinearReLUFunction` when a gradient is needed, else the forward op alone.
    """
    if not use_triton(x, weight, bias) or onnx_export.exporting():
        return reference.linear_relu(x, weight, bias)
    fp32_mode = fp32_matmul_mode()
    lead = x.shape[:-1]
    flat = len(lead) == 1  # already [M, K]: no reshape either way (host time)
    x2 = x if flat else x.reshape(math.prod(lead), x.shape[-1])  # not -1: K may be 0
    if needs_grad(x, weight, bias):
        y = LinearReLUFunction.apply(x2, weight, bias, fp32_mode)
    else:
        y = call(fwd_op, kernels.linear_relu_fwd, x2, weight, bias, fp32_mode)
    return y if flat else y.reshape(*lead, weight.shape[0])
