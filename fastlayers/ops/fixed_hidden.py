"""The fixed-hidden matmul relu(x @ W + c) with a frozen W: custom ops
``fastlayers::fixed_hidden_{fwd,bwd_input}``, :class:`FixedHiddenFunction` and
:func:`fixed_hidden`, the one place its path is chosen."""
import math

import torch
from torch import Tensor

from .. import reference
from .._backend import (fp32_matmul_mode, get_backend, in_forward_backend, kernel_module,
                        use_triton)
from ._dispatch import call, needs_grad
from ._operands import checked, expect

kernels = kernel_module("fixed_hidden")


def _fwd(x: Tensor, weight: Tensor, c: float, fp32_mode: str) -> Tensor:
    if use_triton(x):
        return kernels.fixed_hidden_fwd(x, weight, c, fp32_mode)
    return reference.fixed_hidden(x, weight, c)


def _bwd_input(grad_out: Tensor, out: Tensor, weight: Tensor, fp32_mode: str) -> Tensor:
    if use_triton(grad_out):
        return kernels.fixed_hidden_bwd_input(grad_out, out, weight, fp32_mode)
    return reference.fixed_hidden_bwd_input(grad_out, out, weight)


fwd_op = torch.library.custom_op("fastlayers::fixed_hidden_fwd", checked(
    _fwd, lambda x, w, c, mode: expect("fastlayers::fixed_hidden_fwd", mode, x=(x, "MK"),
                                       weight=(w, "KN"))), mutates_args=())
bwd_input_op = torch.library.custom_op("fastlayers::fixed_hidden_bwd_input", checked(
    _bwd_input, lambda g, out, w, mode: expect("fastlayers::fixed_hidden_bwd_input", mode,
                                               grad_out=(g, "MN"), out=(out, "MN"),
                                               weight=(w, "KN"))), mutates_args=())


@fwd_op.register_fake
def _(x, weight, c, fp32_mode):
    return x.new_empty((x.shape[0], weight.shape[1]))


@bwd_input_op.register_fake
def _(grad_out, out, weight, fp32_mode):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    """Save the output (its sign is the ReLU mask) and the weight (x is not needed)."""
    _x, weight, _c, fp32_mode = inputs
    ctx.fp32_mode, ctx.backend = fp32_mode, get_backend()
    ctx.save_for_backward(weight, output)


@in_forward_backend
def _backward(ctx, grad_out):
    """Kernel for a plain backward (on the forward's backend); torch's differentiable
    composite under create_graph."""
    weight, out = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (reference.fixed_hidden_bwd_input(grad_out, out, weight)
                  if torch.is_grad_enabled()
                  else call(bwd_input_op, _bwd_input, grad_out, out, weight, ctx.fp32_mode))
    return grad_x, None, None, None


class FixedHiddenFunction(torch.autograd.Function):
    """y = relu(x @ weight + c) for x [M, K], a frozen weight [K, N] and a float c."""

    @staticmethod
    def forward(ctx, x, weight, c, fp32_mode):
        out = call(fwd_op, _fwd, x, weight, c, fp32_mode)
        _setup_context(ctx, (x, weight, c, fp32_mode), out)
        return out

    backward = staticmethod(_backward)


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fixed_hidden(x: Tensor, weight: Tensor, c: float) -> Tensor:
    """relu(x @ weight + c) for validated x [..., K]: THE place its path is chosen. torch
    path: torch's ops and autograd; kernel path: leading dims flattened (``reshape``),
    through :class:`FixedHiddenFunction` when x needs a gradient, else the forward alone."""
    if not use_triton(x, weight):
        return reference.fixed_hidden(x, weight, c)
    fp32_mode = fp32_matmul_mode()
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: in_features may be 0
    if needs_grad(x):
        y = FixedHiddenFunction.apply(x2, weight, c, fp32_mode)
    else:
        y = call(fwd_op, kernels.fixed_hidden_fwd, x2, weight, c, fp32_mode)
    return y.reshape(*lead, weight.shape[1])
