"""Launchers for the fixed-hidden matmul relu(x @ W + c) on the fused GEMM.

x [M, K] and the frozen weight W [K, N] (the seed's ``rand_weight`` layout: in x out), any
strides; c a Python float added in fp32 before the ReLU; one rounding to x's dtype. The
weight gets no gradient, so the backward is one GEMM with the ReLU mask as a gate.
"""
from .gemm import fused_gemm


def fixed_hidden_fwd(x, weight, c, fp32_mode="ieee"):
    """y = relu(x @ weight + c) [M, N]: one kernel, fp32 accumulation."""
    return fused_gemm(x, weight, scalar=c, relu=True, fp32_mode=fp32_mode)


def fixed_hidden_bwd_input(grad_out, out, weight, fp32_mode="ieee"):
    """grad_x = (grad_out masked where out <= 0) @ weight.T  -> [M, K]."""
    return fused_gemm(grad_out, weight.t(), gate=out, fp32_mode=fp32_mode)
