"""Functional forms of the fused ops (the modules in ``fastlayers.layers`` call these).

Every function validates its input (clear errors naming shape, dtype and device),
follows ``torch.autocast`` like the torch op it replaces, and dispatches to the Triton
kernels or the torch reference (see ``fastlayers.backend_info()``).
"""
from torch import Tensor

from . import reference
from ._backend import fp32_matmul_mode, use_triton
from ._validate import autocast_dtype, check_float, check_same
from .ops import eager
from .ops import linear_relu as _lr
from .ops import centered as _centered


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor = None) -> Tensor:
    """relu(x @ weight.T + bias), fused into one kernel (forward and backward).

    x: [..., in_features], any number of leading dims (none too), any strides.
    weight: [out_features, in_features], as in nn.Linear. bias: [out_features] or None.
    Numerics: fp32 accumulation for every dtype, one rounding to x's dtype at the end;
    fp32 inputs follow torch's matmul precision switches (``'highest'``: fp32-accurate;
    ``'high'``/``'medium'``: TF32 allowed on CUDA). Under autocast all three are cast to
    the autocast dtype first, as F.linear would be.
    """
    op = "linear_relu"
    check_float(op, "input", x)
    check_float(op, "weight", weight)
    if bias is not None:
        check_float(op, "bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: input has shape {tuple(x.shape)}, but weight {tuple(weight.shape)} "
                         f"expects in_features={weight.shape[1]} in the last dim")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    check_same(op, {"input": x, "weight": weight, "bias": bias})

    if eager() and not use_triton(x):
        return reference.linear_relu(x, weight, bias)  # torch's own autograd, no wrapper cost
    y = _lr.linear_relu(x.reshape(-1, x.shape[-1]), weight, bias, fp32_matmul_mode())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def centered(x: Tensor, dim=None) -> Tensor:
    """x - x.mean() (dim=None, the seed's CenteredLayer) or x - x.mean(dim, keepdim=True).

    x: floating point, any rank (0-d too), any strides; empty gives empty. dim: None (all
    elements), an int or a tuple of ints (negative counts from the end; () means all).
    Numerics: the mean accumulates in fp32 and ``x - mean`` is computed in fp32, rounded
    once to x's dtype (float64 stays float64). Backward: dx = dy - mean(dy) over the same
    dims. Deterministic: the same input gives bitwise the same output.
    """
    op = "centered"
    check_float(op, "input", x)
    dims = _centered.normalize_dims(op, x.dim(), dim)
    if eager() and not use_triton(x):
        return reference.centered(x, dims)  # torch's own autograd, no wrapper cost
    return _centered.centered(x, dims)
