"""The seed's halving loop without a sync: custom op ``fastlayers::halve_until`` returning
``(y, k)``, its torch implementation, and :class:`HalveUntilFunction` (gradient g * 2**-k).
The literal loop is :func:`fastlayers.reference.halve_until_loop` (the tests' oracle).

The count rule (the Triton kernels of ``fastlayers.kernels.halve_until`` evaluate it;
their docstring says how). Let h^j(x) be x halved j times element by element (``x /= 2``
j times: exact, except that a result below the smallest normal number rounds at each
halving), S_j the sum of |h^j(x)| in x's dtype and t the threshold as torch's ``>`` sees it
(rounded to x's dtype). S_j never grows with j, so the loop ends after
k = #{j >= 0 : S_j > t} halvings with y = h^k(x) (:func:`halve_bits`).

* While no element's halving rounds, S_j = S_0 * 2**-j exactly, so k = k0, the least j
  with S_0 * 2**-j <= t, read from the exponents and mantissas of S_0 and t. If S_0
  overflows while every element is finite, k0 comes from (|x| * 2**-64).sum() plus 64.
* Otherwise (an element rounds within k0 halvings, or S_0 overflowed), k lies in the window
  k0 - 1 - D .. k0 + 1 of :func:`window_below`, whose sums S_j are evaluated.
* NaN in x: k = 0, y = x (the seed's ``NaN > t`` is False). ±inf in x (the seed never
  ends): k = K_FOREVER and y is the loop's limit (finite elements -> signed zeros).

CUDA tensors cost no device-to-host copy (the count stays on the device: the kernels, or
:func:`torch_count` and :func:`halve_bits`); CPU tensors read sums on the host
(:func:`_cpu_halve`: the first case as one multiply, else the loop from the window's low end),
as does any tensor under ``torch.jit.trace`` (the traced graph holds k as a constant, as
the seed's loop traced holds its iterations).
"""
import functools
import inspect
import math
import struct
import warnings
from typing import Tuple

import torch
from torch import Tensor

from .._backend import _jit_tracing, _torch_only_context, kernel_module, use_triton
from .._validate import check_threshold, plain
from ._dispatch import call, eager, needs_grad

kernels = kernel_module("halve_until")

K_FOREVER = torch.iinfo(torch.int32).max  # "the loop never ends"; == kernels.halve_until's
_SCALE_DOWN = 64  # the overflow fallback sums |x| * 2**-64 (a finite sum for any finite x)


@torch.compiler.assume_constant_result  # Dynamo: a constant of the graph, no .item()
def _threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """The threshold as the seed's ``tensor > threshold`` sees it: rounded to ``dtype`` the
    way torch converts a Python scalar (through fp32 for 16-bit dtypes). Raises as
    ``fastlayers.functional.halve_until`` does for a threshold the loop cannot use (a direct
    call of the op comes here unchecked) or a dtype that is not floating-point."""
    if not dtype.is_floating_point:
        raise TypeError(f"fastlayers::halve_until: x must be a floating-point tensor, got "
                        f"{dtype}")
    return float(torch.tensor(check_threshold("fastlayers::halve_until", dtype, threshold),
                              dtype=dtype))


threshold_in = functools.lru_cache(maxsize=256)(_threshold_in)  # (eager: no tensor per call)


def window_below(n: int, dtype: torch.dtype, t: float) -> int:
    """D of the window k0 - 1 - D .. k0 + 1 that holds the loop's k for n elements.

    With q the dtype's smallest subnormal: each halved element is within one q of the exact
    x * 2**-j and is 0 or below 3 * x * 2**-j, and a sum's relative rounding error is below
    2**-7 (fp32 accumulation, then bf16/fp16 rounding). So S_{k0+2} < t always, and
    S_j > t for every j <= k0 - 2 - D once 2**(D+1) >= 1.02 + 1.01 * n * q / t.
    """
    fi = torch.finfo(dtype)
    return max(0, math.ceil(math.log2(1.02 + 1.01 * n * (fi.tiny * fi.eps) / t)) - 1)


def _format(dtype: torch.dtype):
    """(fraction bits P, all-ones biased exponent, same-width integer dtype)."""
    fi = torch.finfo(dtype)
    P = round(-math.log2(fi.eps))
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[fi.bits]
    return P, (1 << (fi.bits - 1 - P)) - 1, ints


# ---------------------------------------------------------------------------- the rule
def _halvings(s: Tensor, t: float) -> Tensor:
    """min{j integer : s * 2**-j <= t} (int64, may be negative) for positive finite s, t."""
    sb = s.double().view(torch.int64)
    (tb,) = struct.unpack("<q", struct.pack("<d", t))
    low = (1 << 52) - 1
    return (sb >> 52) - (tb >> 52) + ((sb & low) > (tb & low)).long()


def _scaled_sum(a: Tensor) -> Tensor:
    """sum |x| * 2**-_SCALE_DOWN for a = |x| (16-bit accumulated in fp32): k0's source
    when the sum S_0 itself overflows (finite for any finite x)."""
    acc = torch.float32 if a.element_size() == 2 else a.dtype
    return (a.to(acc) * 2.0 ** -_SCALE_DOWN).sum()


def _normal_halvings(dtype: torch.dtype) -> int:
    """The largest k with 2**-k a normal number where a ``dtype`` tensor times a Python
    float computes (fp64 for fp64, else fp32): there a multiply by 2**-k is exact."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (_format(wide)[1] >> 1) - 1  # 2**-(bias - 1): the smallest normal number


def _dense(x: Tensor) -> bool:
    """Whether x's elements tile a block of memory without gaps or overlaps, in any dim
    order: then torch's ``x.abs()`` keeps x's layout, else it is written contiguous."""
    span = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n != 1):
        if stride != span:
            return False
        span *= size
    return True


def torch_count(x: Tensor, t: float) -> Tensor:
    """The loop's halving count (int32 0-dim on x's device) for x of any shape and a
    threshold t already in x's dtype (a positive normal number or inf); no host read.
    |x| is laid out as the loop's ``x.abs()`` is, so the sums add in its order: x's own
    layout when x is dense, else contiguous (:func:`_dense`; under vmap per sample, which
    the batched tensor's own layout need not be)."""
    compiling = torch.compiler.is_compiling()  # (symbolic strides: no layout test)
    a = (x if compiling or _dense(x) else x.contiguous()).abs()
    s0 = a.sum()  # torch's own sum in x's dtype: the seed's first comparison
    s1 = _scaled_sum(a)
    forever = torch.tensor(K_FOREVER, device=x.device)
    k0 = torch.where(s0 <= t, 0, torch.where(
        s0 < math.inf, _halvings(s0, t),
        torch.where(s1 < math.inf, (_halvings(s1, t) + _SCALE_DOWN).clamp_min(0), forever)))
    k0 = torch.where(torch.isnan(s0), 0, k0)
    below = window_below(x.numel(), x.dtype, t)
    lo = (k0 - 1 - below).clamp(0, K_FOREVER)
    k = lo
    for i in range(below + 3):
        j = lo + i
        k = torch.where(halve_bits(a, j).sum() > t, j + 1, k)
    return torch.where(k0 == K_FOREVER, k0, k).to(torch.int32)  # NaN: k0 = 0 and S_j > t never


def halve_bits(x: Tensor, k: Tensor) -> Tensor:
    """x halved k times element by element exactly like ``x /= 2`` k times (k: integer 0-dim
    tensor on x's device). Same integer formula as ``kernels.halve_until._halve_bits``.

    With |x| = m * 2**e quanta (m the significand with its implicit bit, e = max(E - 1, 0)):
    while k <= e every halving is exact (the biased exponent drops by k); past that, the
    r = k - e roundings (half to even) of the integer m give
    (m >> r) + (((m & M) + ((m >> 1) & M)) >> r), M = 2**r - 1. ±inf and NaN stay.
    """
    P, emax, ints = _format(x.dtype)
    wide = torch.int64 if P > 23 else torch.int32
    u = x.resolve_neg().view(ints).to(wide)  # (a negative-bit view's memory holds -x)
    mag = u & ((1 << (torch.finfo(x.dtype).bits - 1)) - 1)
    sign = u ^ mag
    E = mag >> P
    e = (E - 1).clamp_min(0)
    m = torch.where(E > 0, (mag & ((1 << P) - 1)) | (1 << P), mag)
    k = k.to(wide)
    r = (k - e).clamp(0, (P + 1) + 1)  # r > P + 1 rounds every m to 0, as P + 2 does
    M = (torch.ones_like(r) << r) - 1
    sub = (m >> r) + (((m & M) + ((m >> 1) & M)) >> r)
    res = torch.where(k <= e, mag - (k.clamp(max=emax) << P), sub)
    res = torch.where(E == emax, mag, res)
    return (sign | res).to(ints).view(x.dtype)


def scale_grad(g: Tensor, k: Tensor) -> Tensor:
    """g * 2**-k rounded once to g's dtype (0 for k = K_FOREVER), 16-bit g through fp32.

    On the CPU in eager mode k is read on the host (free there), and when 2**-k is a normal
    number it is one multiply by a Python float; otherwise :func:`scale_grad_on_device`.
    """
    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
    if k.is_cpu and eager() and not _torch_only_context():
        kk = int(k)
        if kk <= _normal_halvings(g.dtype):
            return (g.to(wide) * 2.0 ** -kk).to(g.dtype)
    return scale_grad_on_device(g, k)


def scale_grad_on_device(g: Tensor, k: Tensor) -> Tensor:
    """:func:`scale_grad` from tensor ops only (no host read of k).

    2**-k is a power of two of the format (normal or subnormal) for k <= LOW (fp32: 149):
    one product, one rounding. A larger k first takes the rest k - LOW as two normal
    powers, exact whenever the final result is not 0.
    """
    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
    P, emax, ints = _format(wide)
    bias = emax >> 1
    low = bias - 1 + P  # 2**-low: the smallest subnormal
    k = k.to(torch.int64)
    k_last = k.clamp(max=low)
    k1 = (k - k_last).clamp(max=bias - 1)
    k2 = (k - k_last - k1).clamp(max=bias - 1)

    def pow2(j):  # 2**-j for 0 <= j <= low, from its bit pattern
        bits = torch.where(j < bias, (bias - j) << P, 1 << (low - j).clamp(0, P))
        return bits.to(ints).view(wide)

    return (g.to(wide) * pow2(k1) * pow2(k2) * pow2(k_last)).to(g.dtype)


_TRACED_K = (
    "fastlayers.halve_until under torch.jit.trace: the halving count k is recorded as a "
    "constant (as tracing the seed's `while x.abs().sum() > t: x /= 2` records its "
    "iterations), so the traced graph is right only for inputs with the same count; "
    "torch.compile, torch.export and torch.onnx.export compute k from the input")


def _cpu_halve(x: Tensor, t: float, exact_only: bool = False):
    """(y, k) for a CPU tensor with host reads (free there; also any tensor under
    ``torch.jit.trace``, with a warning), else None (an infinite element: the device
    route). The seed's sums S_j are S_0 * 2**-j while no element rounds, i.e.
    for j up to s, the least nonzero |x|'s halvings above the smallest normal number:

    * k0 <= s (the common case): y = x * 2**-k0, one exact multiply, differentiable
      (torch's autograd gives g * 2**-k).
    * otherwise (``exact_only``: None) the loop itself, from the window's low end on:
      one exact multiply to 2**-min(s, lo), ``/= 2`` up to lo (no sums: S_j > t there),
      then ``while S_j > t: /= 2`` in the seed's layout (the loop's summation order),
      at most up to k0 + 1 (the window's top: the loop ends there).

    Measured (timeit, one thread, dev CPU): the device route costs 28x the common case
    at 2x20 fp32 and 93x at 4096x20; fp16 4096x20 (elements below 2**-14 after a few
    halvings; its sum overflows) 3447 -> 328 us, the seed's loop 569 us."""
    if _jit_tracing() is not None:
        warnings.warn(_TRACED_K, torch.jit.TracerWarning, stacklevel=3)
    a = x.detach().abs()
    s0 = float(a.sum())
    if not s0 > t:  # s0 <= t, or NaN: the loop never runs
        return x.clone(memory_format=torch.contiguous_format), 0
    finite = s0 < math.inf
    if not finite and (exact_only or float(a.amax()) == math.inf):
        return None  # an infinite element (k = K_FOREVER), or no exact shortcut
    if not finite:  # the sum overflowed: k0 as torch_count takes it (its window holds k)
        s0 = float(_scaled_sum(a))
    (sm, se), (tm, te) = math.frexp(s0), math.frexp(t)
    k0 = max(se - te + (sm > tm) + (0 if finite else _SCALE_DOWN), 0)  # _halvings on host
    least = float(a.amin())
    if least == 0 and _jit_tracing() is not None:  # (the tracer cannot record dtype views)
        least = float(torch.where(a == 0, math.inf, a).amin())
    elif least == 0:  # zeros halve exactly (ReLU outputs): the least nonzero |x| decides,
        ints = _format(x.dtype)[2]  # from the bits with 0 mapped past every pattern (30 us
        bits = ((a.view(ints) - 1) & torch.iinfo(ints).max).amin() + 1  # at 4096x20 fp32,
        least = float(bits.view(x.dtype))  # where torch.where(a == 0, inf, a) takes 383 us)
    fi = torch.finfo(x.dtype)
    s = max(math.frexp(least)[1] - math.frexp(fi.tiny)[1], 0)  # least * 2**-s >= tiny
    s = min(s, _normal_halvings(x.dtype))  # 2**-s a normal multiplier
    if finite and k0 <= s:
        return x.contiguous() * 2.0 ** -k0, k0
    if exact_only:
        return None
    k = max(k0 - 1 - window_below(x.numel(), x.dtype, t), 0)
    y = x.detach() * 2.0 ** -min(s, k)  # in x.abs()'s layout: torch_count's summation order
    for _ in range(k - min(s, k)):
        y.mul_(0.5)  # x * 0.5 is x / 2 (one correctly rounded result), 1.5x faster here
    for _ in range(k0 + 2 - k):  # the loop's k <= k0 + 1 (window_below): a bounded loop
        if not float(y.abs().sum()) > t:
            break
        y.mul_(0.5)
        k += 1
    return y.contiguous(), k


# ------------------------------------------------------------------------------ the op
def _impl(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    t = threshold_in(x.dtype, threshold)
    if use_triton(x):
        y, k = kernels.halve_until(x.contiguous().view(-1), t, window_below(x.numel(), x.dtype, t))
        return y.view(x.shape), k
    # torch.jit.trace: the host route too (the tracer cannot record the device route's
    # dtype views), which warns that k becomes a constant of the traced graph
    if (x.device.type == "cpu" and plain(x)) or _jit_tracing() is not None:
        done = _cpu_halve(x, t)  # (a DTensor's host read would see one shard only)
        if done is not None:
            return done[0], torch.tensor(done[1], dtype=torch.int32)
    k = torch_count(x, t)  # on x's own layout: the loop's summation order
    return halve_bits(x.contiguous(), k), k  # y contiguous, as the fake kernel promises


op = torch.library.custom_op("fastlayers::halve_until", _impl, mutates_args=())


@op.register_fake
def _(x, threshold):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty((), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_k):
    (k,) = ctx.saved_tensors
    return scale_grad(grad_y, k), None


op.register_autograd(_backward, setup_context=_setup_context)


class HalveUntilFunction(torch.autograd.Function):
    """(y, k) = halve_until(x, threshold), dy/dx = 2**-k (k is piecewise constant in x), in
    eager mode. Under ``torch.func`` transforms and forward-mode AD its forward takes tensor
    ops only (no host reads, so the generated vmap rule batches it, each sample with its own
    k), with a jvp (tangent * 2**-k); otherwise the op's implementation. Traced code
    (torch.compile, export) takes the op with its own formula instead (``register_autograd``
    above): Dynamo cannot trace a Function with a custom jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, threshold):
        if not _torch_only_context():
            return _impl(x, threshold)
        k = torch_count(x, threshold_in(x.dtype, threshold))
        return halve_bits(x.contiguous(), k), k

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(output[1])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_tangent, _threshold_tangent):
        return scale_grad(x_tangent, ctx.saved_tensors[0]), None


# Function.apply binds a setup_context-style forward's arguments with inspect.signature on
# every call (~13 us of a 2x20 call on the dev CPU); inspect returns a stored one at once.
HalveUntilFunction.forward.__signature__ = inspect.signature(HalveUntilFunction.forward)

def _traced_transform_body(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """(y, k) from tensor ops with autograd's own formulas, for torch.compile tracing a
    torch.func transform (Dynamo cannot trace :class:`HalveUntilFunction`'s custom jvp, and
    the op has no batching or jvp rule). y is :func:`halve_bits`'s, bit for bit: the term
    subtracted is a zero (NaN where x is) whose derivative is :func:`scale_grad`'s
    ``dx * 2**-k`` (0 where x is ±inf, as there k = K_FOREVER)."""
    xd = x.detach()
    k = torch_count(xd, _threshold_in(x.dtype, threshold))
    zero = torch.where(torch.isinf(xd), torch.zeros_like(xd), xd - x)  # +0: y - 0 is y
    return halve_bits(xd.contiguous(), k) - scale_grad_on_device(zero, k), k


# ------------------------------------------------------------------------- entry point
def halve_until(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """(y, k) for a validated x and threshold (``fastlayers.functional.halve_until``
    checks them): THE place its path is chosen. Eager autograd, torch.func transforms and
    forward-mode AD: :class:`HalveUntilFunction`; traced autograd: the op with its own
    formula; otherwise the op's implementation (kernels or the torch route, by
    :func:`use_triton`). Eager autograd of a CPU tensor on the torch path first tries
    :func:`_cpu_halve`'s common case, whose exact multiply by 2**-k carries the gradient
    g * 2**-k through torch's own autograd (B=2 FixedHiddenMLP forward+backward: no
    Function.apply)."""
    if _torch_only_context():
        if torch.compiler.is_compiling():
            return _traced_transform_body(x, threshold)
        return HalveUntilFunction.apply(x, threshold)
    if needs_grad(x) and eager():
        if x.is_cpu and plain(x) and not use_triton(x):
            done = _cpu_halve(x, threshold_in(x.dtype, threshold), exact_only=True)
            if done is not None:
                return done[0], torch.tensor(done[1], dtype=torch.int32)
        return HalveUntilFunction.apply(x, threshold)
    if needs_grad(x):
        return op(x, threshold)
    return call(op, _impl, x, threshold)
