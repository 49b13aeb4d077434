"""Launchers for Linear + bias + ReLU, forward and backward, on the fused GEMM.

Shapes follow nn.Linear: x [M, K], weight [N, K] (any strides), bias [N] or None,
y = relu(x @ weight.T + bias) [M, N]. The backward applies the ReLU mask (y > 0) inside
the gradient GEMMs instead of materialising dy * (y > 0).
"""
from .gemm import fused_gemm


def linear_relu_fwd(x, weight, bias, fp32_mode="ieee"):
    """y = relu(x @ weight.T + bias): one kernel, fp32 accumulation, rounded once."""
    return fused_gemm(x, weight.t(), bias=bias, relu=True, fp32_mode=fp32_mode)


def linear_relu_bwd_input(grad_out, out, weight, fp32_mode="ieee"):
    """grad_x = (grad_out masked where out <= 0) @ weight  -> [M, K]."""
    return fused_gemm(grad_out, weight, gate=out, fp32_mode=fp32_mode)


def linear_relu_bwd_params(grad_out, out, x, fp32_mode="ieee"):
    """(grad_weight [N, K], grad_bias [N]) from one kernel: the weight GEMM reduces over
    the batch, and its first column of programs also sums the masked grad_out rows."""
    return fused_gemm(grad_out.t(), x, gate=out.t(), rowsum=True, fp32_mode=fp32_mode)
