"""FLOP formulas for the custom ops, so ``torch.utils.flop_counter.FlopCounterMode`` (and
the profiler's FLOP column) count fastlayers models as they count the unfused torch model.

FlopCounterMode is a dispatch mode; under any dispatch mode fastlayers calls its registered
custom ops (``fastlayers.ops.eager()`` is False), so the mode sees ``fastlayers::*`` ops
and not the matmuls inside them. Counting follows torch's own rules: a [M, K] x [K, N]
matmul is 2*M*K*N FLOPs; bias adds, ReLU, sums, means and the halving scale count 0.

    op                              counts (x [M, K], weight W, hidden/out N; d for the MLP)
    linear_relu_fwd                 2*M*K*N               (addmm)
    linear_relu_bwd_input           2*M*N*K               (grad_x = g @ W)
    linear_relu_bwd_params          2*N*M*K               (grad_W = g.T @ x; grad_b a sum)
    fixed_hidden_fwd                2*M*K*N               (x @ W)
    fixed_hidden_bwd_input          2*M*N*K
    fixed_hidden_mlp_fwd            3 * 2*M*d*d           (Linear, matmul, Linear)
    fixed_hidden_mlp_bwd            5 * 2*M*d*d           (grad_y@W, @R.T, @W, 2 weight grads)
    centered_fwd, halve_until       0                     (torch counts mean/sub/sum as 0)

fixed_hidden_mlp_bwd always computes grad_x as well, so it matches torch's count for an input
that requires grad (torch skips grad_x otherwise: 4 instead of 5 matmuls).
"""
import torch
from torch.utils.flop_counter import register_flop_formula

from . import ops  # noqa: F401  (registers the custom ops this module refers to)

_fl = torch.ops.fastlayers


def _mm(m, k, n) -> int:
    return 2 * m * k * n


@register_flop_formula(_fl.linear_relu_fwd)
def _linear_relu_fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _mm(x_shape[0], x_shape[1], w_shape[0])


@register_flop_formula(_fl.linear_relu_bwd_input)
def _linear_relu_bwd_input(g_shape, out_shape_, w_shape, *args, out_shape=None, **kwargs):
    return _mm(g_shape[0], g_shape[1], w_shape[1])


@register_flop_formula(_fl.linear_relu_bwd_params)
def _linear_relu_bwd_params(g_shape, out_shape_, x_shape, *args, out_shape=None, **kwargs):
    return _mm(g_shape[1], g_shape[0], x_shape[1])


@register_flop_formula(_fl.fixed_hidden_fwd)
def _fixed_hidden_fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _mm(x_shape[0], x_shape[1], w_shape[1])


@register_flop_formula(_fl.fixed_hidden_bwd_input)
def _fixed_hidden_bwd_input(g_shape, out_shape_, w_shape, *args, out_shape=None, **kwargs):
    return _mm(g_shape[0], g_shape[1], w_shape[0])


@register_flop_formula(_fl.fixed_hidden_mlp_fwd)
def _fixed_hidden_mlp_fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * _mm(x_shape[0], w_shape[1], w_shape[0])


@register_flop_formula(_fl.fixed_hidden_mlp_bwd)
def _fixed_hidden_mlp_bwd(g_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 5 * _mm(x_shape[0], w_shape[1], w_shape[0])
