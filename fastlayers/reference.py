"""Plain-torch versions of every fused op: the fallback on devices without Triton kernels,
and (called on float64 copies of the inputs) the oracle the tests compare against.

Each function computes in the dtype of its inputs with torch's own kernels, so on CPU it is
as fast as eager torch and in float64 it is an independent high-precision reference.
"""
import torch
import torch.nn.functional as F

from ._validate import plain

_F16, _BF16 = torch.float16, torch.bfloat16


def relu_grad(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad_out where out > 0, else 0: torch's own ReLU backward (threshold_backward: NaN
    outputs pass the gradient; differentiable, with ``out`` in the graph as torch has it)."""
    return torch.ops.aten.threshold_backward(grad_out, out, 0)


_INPLACE_MIN = 4096  # elements; measured crossover on CPU (64x64: a tie)
_tracing_state = torch._C._get_tracing_state  # not None while torch.jit.trace records
_compiling = torch.compiler.is_compiling


def _in_place_ok(y: torch.Tensor) -> bool:
    """Whether an elementwise op may overwrite y, a fresh tensor nothing else holds.

    Yes without autograd; with autograd recording y only from ``_INPLACE_MIN`` elements up:
    below that an in-place op on a recorded tensor costs more host time than a new tensor
    (~4% of a 2x64x8 layer with grad on CPU), above it the saved buffer wins (256x256x256
    with grad: 1-2% faster; paired ratios on the 2-core dev CPU). A symbolic size
    (torch.export) and torch.compile take the new tensor: no guard on the size. Never while
    ``torch.jit.trace`` records: its check re-runs the model under no_grad and must record
    the same graph. Values and gradients are the same either way."""
    if _tracing_state() is not None or not plain(y):
        return False  # (a subclass such as a Partial DTensor: its own rules for in-place)
    if not y.requires_grad:
        return True
    n = y.numel()
    return isinstance(n, int) and not _compiling() and n >= _INPLACE_MIN


def _relu(y: torch.Tensor) -> torch.Tensor:
    """relu(y) for a fresh y (in place when :func:`_in_place_ok`)."""
    return y.relu_() if _in_place_ok(y) else torch.relu(y)


# ---------------------------------------------------------------- linear + bias + relu
def linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) for x [M, K], weight [N, K], bias [N] or None."""
    return _relu(F.linear(x, weight, bias))


def linear_relu_bwd_input(grad_out, out, weight):
    """Gradient w.r.t. x [M, K] given grad_out and the forward output out [M, N]."""
    return relu_grad(grad_out, out) @ weight


def linear_relu_bwd_params(grad_out, out, x):
    """(grad_weight [N, K], grad_bias [N]) given grad_out, out [M, N] and x [M, K]."""
    g = relu_grad(grad_out, out)
    return g.t() @ x, g.sum(0)


# ---------------------------------------------------------------- fixed-hidden matmul, MLP
# (halve_until's torch path emulates the seed's loop bit by bit: fastlayers/ops/halve_until.py)
def fixed_hidden(x, weight, c=1.0):
    """relu(x @ weight + c) for x [M, K] and a frozen weight [K, N] (the seed's layout).
    16-bit x: the product and ``+ c`` in fp32, rounded once to x's dtype (the seed's
    ``relu(mm(X, W) + 1)`` rounds the product first, then the sum: one ulp apart at times)."""
    dtype = x.dtype
    if dtype is _F16 or dtype is _BF16:  # (autocast off: it would cast the fp32 product back)
        with torch.autocast(x.device.type, enabled=False):
            return torch.relu(torch.matmul(x.float(), weight.float()) + c).to(dtype)
    y = torch.matmul(x, weight)
    return _relu(y.add_(c) if _in_place_ok(y) else y + c)


def fixed_hidden_bwd_input(grad_out, out, weight):
    """Gradient w.r.t. x [M, K] given grad_out and the forward output out [M, N]."""
    return relu_grad(grad_out, out) @ weight.t()


def fixed_hidden_mlp_body(x, weight, bias, rand_weight, c=1.0):
    """(y, h2) of the seed's FixedHiddenMLP before its halving loop: ONE Linear used twice,
    h2 = relu(linear(x) @ rand_weight + c), y = linear(h2)."""
    h2 = fixed_hidden(F.linear(x, weight, bias), rand_weight, c)
    return F.linear(h2, weight, bias), h2


def fixed_hidden_mlp_bwd(grad_y, x, weight, rand_weight, h2):
    """(grad_x, grad_weight, grad_bias) of :func:`fixed_hidden_mlp_body` given dL/dy."""
    g_h1 = relu_grad(grad_y @ weight, h2) @ rand_weight.t()
    return g_h1 @ weight, grad_y.t() @ h2 + g_h1.t() @ x, grad_y.sum(0) + g_h1.sum(0)


# ---------------------------------------------------------------- centered: x - mean(x)
def centered_mean(x, dims=()):
    """mean(x) over ``dims`` (all dims when empty), keepdim, accumulated and returned in
    fp32 for 16-bit x (so ``x - mean`` computes in fp32), else in x's dtype."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.mean(dim=tuple(dims) if dims else tuple(range(x.dim())), keepdim=True, dtype=acc)


def centered(x, dims=()):
    """x - mean(x) over ``dims`` (all elements when empty: the seed's ``X - X.mean()``).
    16-bit x: mean and difference in fp32, rounded once to x's dtype. All elements of an
    fp32/fp64 x whose size n is a power of two: ``x - x.sum() * (1/n)`` in one op, which is
    bitwise ``x - x.mean()`` (torch's mean is sum / n, exact for n = 2**j), values and
    gradients, and ~25% less host time on small CPU tensors; only a subnormal mean differs
    (by less than one of its ulps: the product is not rounded before the subtraction). A
    size that is not a plain int (symbolic in torch.export, a tensor under
    ``torch.jit.trace``) and torch.compile (where Dynamo treats a symbolic size as an int)
    take ``x - x.mean()``: no shape guard, and a traced graph stays right for every size."""
    dtype = x.dtype
    if dtype is _F16 or dtype is _BF16:  # (identity: dtypes are singletons; cheaper than in)
        return (x - centered_mean(x, dims)).to(dtype)
    if dims:
        return x - x.mean(dims, keepdim=True)
    n = x.numel()
    if isinstance(n, int) and not _compiling() and n & (n - 1) == 0 and n:  # n = 2**j
        return torch.sub(x, x.sum(), alpha=1.0 / n)
    return x - x.mean()


# ---------------------------------------------------------------- the seed's halving loop
def halve_until_loop(x, threshold=1.0):
    """(y, k): the seed's ``while X.abs().sum() > threshold: X /= 2`` literally, on a copy
    of x, with its iteration count k. The oracle of ``fastlayers.functional.halve_until``
    (it syncs once per iteration and never ends on ±inf: never call it on such input)."""
    x = x.clone()
    k = 0
    while x.abs().sum() > threshold:
        x /= 2
        k += 1
    return x, k
