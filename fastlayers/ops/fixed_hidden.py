"""The fixed-hidden matmul relu(x @ W + c) with a frozen W: custom ops
``fastlayers::fixed_hidden_{fwd,bwd_input}`` and :class:`FixedHiddenFunction` (2-D input;
the functional wrapper flattens leading dims and validates)."""
import torch
from torch import Tensor

from .. import reference
from .._backend import fp32_matmul_mode, use_triton
from .._validate import autocast_dtype, check_matmul_operands, check_same
from ._dispatch import call, eager, needs_grad

try:
    from fastlayers.kernels import fixed_hidden as kernels
except ImportError:  # no triton: use_triton() is then always False
    kernels = None


def _fwd(x: Tensor, weight: Tensor, c: float, fp32_mode: str) -> Tensor:
    if use_triton(x):
        return kernels.fixed_hidden_fwd(x, weight, c, fp32_mode)
    return reference.fixed_hidden(x, weight, c)


def _bwd_input(grad_out: Tensor, out: Tensor, weight: Tensor, fp32_mode: str) -> Tensor:
    if use_triton(grad_out):
        return kernels.fixed_hidden_bwd_input(grad_out, out, weight, fp32_mode)
    return reference.fixed_hidden_bwd_input(grad_out, out, weight)


fwd_op = torch.library.custom_op("fastlayers::fixed_hidden_fwd", _fwd, mutates_args=())
bwd_input_op = torch.library.custom_op("fastlayers::fixed_hidden_bwd_input", _bwd_input,
                                       mutates_args=())


@fwd_op.register_fake
def _(x, weight, c, fp32_mode):
    return x.new_empty((x.shape[0], weight.shape[1]))


@bwd_input_op.register_fake
def _(grad_out, out, weight, fp32_mode):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    """Save the output (its sign is the ReLU mask) and the weight (x is not needed)."""
    _x, weight, _c, fp32_mode = inputs
    ctx.fp32_mode = fp32_mode
    ctx.save_for_backward(weight, output)


def _backward(ctx, grad_out):
    weight, out = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = call(bwd_input_op, _bwd_input, grad_out, out, weight, ctx.fp32_mode)
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


def fixed_hidden(x: Tensor, weight: Tensor, c: float, fp32_mode: str) -> Tensor:
    """2-D entry point: through autograd when x needs a gradient, else the forward alone."""
    if needs_grad(x):
        return FixedHiddenFunction.apply(x, weight, c, fp32_mode)
    return call(fwd_op, _fwd, x, weight, c, fp32_mode)


def fixed_hidden_checked(x: Tensor, weight: Tensor, c=1.0) -> Tensor:
    """See :func:`fastlayers.functional.fixed_hidden` (validation, autocast, leading dims)."""
    opname = "fixed_hidden"
    check_matmul_operands(opname, x, weight, 0, "[in_features, out_features]")
    if weight.requires_grad:
        raise ValueError(f"{opname}: the weight is frozen and gets no gradient, but it "
                         f"requires grad; pass weight.detach() (or use a Linear for a "
                         f"trainable weight)")
    if not isinstance(c, (int, float)) or isinstance(c, bool):
        raise TypeError(f"{opname}: c must be a Python float, got {type(c).__name__}")
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
    check_same(opname, {"input": x, "weight": weight})
    if eager() and not use_triton(x):
        return reference.fixed_hidden(x, weight, float(c))  # torch's own autograd
    y = fixed_hidden(x.reshape(-1, x.shape[-1]), weight, float(c), fp32_matmul_mode())
    return y.view(*x.shape[:-1], weight.shape[1])
