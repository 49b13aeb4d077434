"""Plain-torch versions of every fused op: the fallback on devices without Triton kernels,
and (called on float64 copies of the inputs) the oracle the tests compare against.

Each function computes in the dtype of its inputs with torch's own kernels, so on CPU it is
as fast as eager torch and in float64 it is an independent high-precision reference.
"""
import torch
import torch.nn.functional as F


def relu_grad(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad_out where out > 0, else 0 (torch's threshold_backward: NaN outputs pass)."""
    return torch.where(out <= 0, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device),
                       grad_out)


# ---------------------------------------------------------------- linear + bias + relu
def linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) for x [M, K], weight [N, K], bias [N] or None."""
    return F.linear(x, weight, bias).relu_()


def linear_relu_bwd_input(grad_out, out, weight):
    """Gradient w.r.t. x [M, K] given grad_out and the forward output out [M, N]."""
    return relu_grad(grad_out, out) @ weight


def linear_relu_bwd_params(grad_out, out, x):
    """(grad_weight [N, K], grad_bias [N]) given grad_out, out [M, N] and x [M, K]."""
    g = relu_grad(grad_out, out)
    return g.t() @ x, g.sum(0)


# ---------------------------------------------------------------- centered: x - mean(x)
def centered_mean(x, dims=()):
    """mean(x) over ``dims`` (all dims when empty), keepdim, accumulated and returned in
    fp32 for 16-bit x (so ``x - mean`` computes in fp32), else in x's dtype."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.mean(dim=tuple(dims) if dims else tuple(range(x.dim())), keepdim=True, dtype=acc)


def centered(x, dims=()):
    """x - mean(x) over ``dims`` (all elements when empty: the seed's ``X - X.mean()``).
    16-bit x: mean and difference in fp32, rounded once to x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return (x - centered_mean(x, dims)).to(x.dtype)
    return x - (x.mean(dims, keepdim=True) if dims else x.mean())
