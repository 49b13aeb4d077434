"""Centering, x - mean(x): custom op ``fastlayers::centered_fwd``, :class:`CenteredFunction`
and :func:`centered`, the one place its path is chosen.

Centering is linear and self-adjoint (the matrix I - 11^T/n is symmetric), so the backward
is the same op applied to the incoming gradient over the same dims; nothing is saved.
"""
import operator
from typing import List

import torch
from torch import Tensor

from .. import onnx_export, reference
from .._backend import get_backend, in_forward_backend, kernel_module, use_triton
from ._dispatch import call, needs_grad

kernels = kernel_module("centered")


def _fwd(x: Tensor, dims: List[int]) -> Tensor:
    """dims: distinct non-negative dims of x, sorted; [] means all elements."""
    if use_triton(x):
        return kernels.centered(x, dims)
    # Same numerics and output layout as the kernels: fp32 mean for 16-bit inputs,
    # x - mean in fp32, one rounding, written into torch.empty_like(x).
    return torch.sub(x, reference.centered_mean(x, dims), out=torch.empty_like(x))


def _op_fwd(x: Tensor, dims: List[int]) -> Tensor:
    """The registered op: :func:`_fwd` for dims as :func:`normalize_dims` takes them (a
    direct call may pass negative, unsorted or all dims; fastlayers' own eager calls run
    :func:`_fwd` with dims :func:`centered` has normalised)."""
    return _fwd(x, normalize_dims("fastlayers::centered_fwd", x.dim(), dims))


fwd_op = torch.library.custom_op("fastlayers::centered_fwd", _op_fwd, mutates_args=())


@fwd_op.register_fake
def _(x, dims):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, dims = inputs
    ctx.dims = normalize_dims("fastlayers::centered_fwd", x.dim(), dims)
    ctx.backend = get_backend()


@in_forward_backend
def _backward(ctx, grad_out):
    """d(x - mean x) = dy - mean(dy) over the same dims (stride-0 grads are fine), on the
    forward's backend."""
    return centered(grad_out, ctx.dims), None


class CenteredFunction(torch.autograd.Function):
    """y = x - mean(x over dims); dx = dy - mean(dy over dims). Twice differentiable.

    forward takes ``ctx`` (no separate setup_context): torch binds arguments through
    ``inspect.signature`` on every call of a setup_context-style Function.
    """

    @staticmethod
    def forward(ctx, x, dims):  # dims: normalised by centered(), its only caller
        ctx.dims, ctx.backend = dims, get_backend()
        return call(fwd_op, _fwd, x, dims)

    backward = staticmethod(_backward)


# The op is differentiable on its own too (torch.ops.fastlayers.centered_fwd).
fwd_op.register_autograd(_backward, setup_context=_setup_context)


def normalize_dims(op: str, ndim: int, dim) -> List[int]:
    """``dim`` (None, an int, or a tuple/list of ints) as sorted distinct non-negative dims;
    [] when it covers every dim (the global mean). A 0-d tensor accepts dim 0 or -1, as in
    torch. Raises IndexError for an out-of-range dim, ValueError for a repeated one and
    TypeError for anything that is not an int."""
    if dim is None:
        return []
    dims = list(dim) if isinstance(dim, (tuple, list, torch.Size)) else [dim]
    rank = max(ndim, 1)
    out = []
    for d in dims:
        try:  # ints and numpy ints; not bools, floats or strings
            d = None if isinstance(d, bool) else operator.index(d)
        except TypeError:
            d = None
        if d is None:
            raise TypeError(f"{op}: dim must be None, an int or a tuple of ints, got {dim!r}")
        if not -rank <= d < rank:
            raise IndexError(f"{op}: dim {d} is out of range for a tensor with {ndim} dims "
                             f"(expected a dim in [{-rank}, {rank - 1}])")
        d %= rank
        if d in out:
            raise ValueError(f"{op}: dim {d} appears more than once in dim={dim!r}")
        out.append(d)
    out.sort()
    return [] if len(out) >= ndim else out


def centered(x: Tensor, dims: List[int]) -> Tensor:
    """x - mean(x over dims) for a validated x: THE place its path is chosen. torch path
    (and ONNX export): :func:`fastlayers.reference.centered` with torch's autograd; kernel
    path: through :class:`CenteredFunction` when a gradient is needed, else the forward
    alone. (The export check only runs on the kernel path: the CPU call pays nothing.)"""
    if not use_triton(x) or onnx_export.exporting():
        return reference.centered(x, dims)
    if needs_grad(x):
        return CenteredFunction.apply(x, dims)
    return call(fwd_op, kernels.centered, x, dims)
