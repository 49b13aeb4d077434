"""The seed's halving loop without a sync: custom op ``fastlayers::halve_until`` returning
``(y, k)``, its torch implementation, and :class:`HalveUntilFunction` (gradient g * 2**-k).

The torch implementation follows the same rules as ``fastlayers.kernels.halve`` (read its
docstring for the numerics); in short, with t = the threshold rounded to x's dtype:

* fp32/bf16: k from torch's own ``x.abs().sum()`` (the very sum the seed compares), so on
  the same device the count is the loop's count; if that sum overflows while every element
  is finite, from ``(x.abs() * 2**-64).sum()`` with 64 added.
* fp16: k from the exact sums of the halved elements (fp16 values are integers of 2**-24),
  via a 32768-bin histogram of |x| and tables of repeated round-half-even halving.
* y = x halved k times element by element; subnormal results are rounded at each halving
  like ``x /= 2`` (integer formula in :func:`halve_bits`), all other results are exact.
* NaN in x: k = 0, y = x. ±inf in x (the seed never ends): k = K_FOREVER and y is the
  loop's limit (finite elements -> signed zeros, ±inf kept).

No device-to-host copy happens for CUDA tensors (the count stays in device memory); CPU
tensors use a few host reads, which cost nothing there.
"""
import functools
import math
import os
import struct
from typing import Tuple

import torch
from torch import Tensor

from .._backend import use_triton
from .._validate import check_float
from ._dispatch import call, needs_grad

try:
    from fastlayers.kernels import halve as kernels
except ImportError:  # no triton: use_triton() is then always False
    kernels = None

K_FOREVER = 2 ** 31 - 1
# (mantissa bits, biased exponent of inf/NaN, bit-pattern dtype) per float dtype
_FORMAT = {torch.float32: (23, 255, torch.int32), torch.float16: (10, 31, torch.int16),
           torch.bfloat16: (7, 255, torch.int16), torch.float64: (52, 2047, torch.int64)}


def _round_f32(v: float) -> float:
    """A Python float rounded to the nearest fp32 (ties to even; overflow gives inf)."""
    if abs(v) >= 2.0 ** 128 * (1 - 2.0 ** -25):
        return math.copysign(math.inf, v)
    return struct.unpack("<f", struct.pack("<f", v))[0]


@torch.compiler.assume_constant_result
def threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """The threshold as the seed's ``tensor > threshold`` sees it: rounded to ``dtype``
    (through fp32 for 16-bit dtypes, as torch converts the Python scalar)."""
    if dtype == torch.float64 or math.isnan(threshold):
        return threshold
    v = _round_f32(threshold)
    if dtype == torch.float16 and math.isfinite(v):
        if abs(v) >= 65520.0:
            return math.copysign(math.inf, v)
        return struct.unpack("<e", struct.pack("<e", v))[0]
    if dtype == torch.bfloat16 and math.isfinite(v):
        b = struct.unpack("<I", struct.pack("<f", v))[0]
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]
    return v


def signed_halvings(s: float, t: float) -> int:
    """min{j integer : s * 2**-j <= t} for positive finite s and t (negative if s << t)."""
    sm, se = math.frexp(s)
    tm, te = math.frexp(t)
    return se - te + (sm > tm)


def count_from_sums(s0: float, s1: float, t: float) -> int:
    """The count from s0 = |x|-sum and s1 = (|x| * 2**-64)-sum, both in x's dtype."""
    if math.isnan(s0) or s0 <= t:  # NaN: the seed stops at once; t = inf: never starts
        return 0
    if s0 < math.inf:
        return signed_halvings(s0, t)
    if s1 < math.inf:  # every element finite, the sum overflowed: the loop halves it
        return max(0, 64 + signed_halvings(s1, t))
    return K_FOREVER


# ------------------------------------------------------------------------------ the count
def _count_by_sum(x: Tensor, t: float) -> Tensor:
    a = x.abs()
    s0 = a.sum()  # torch's own sum in x's dtype: what the seed's comparison sees
    return _device_count_from_sums(s0.double(), (a * 2.0 ** -64).sum().double(), t)


def _device_count_from_sums(s0: Tensor, s1: Tensor, t: float) -> Tensor:
    """:func:`count_from_sums` on 0-dim float64 device tensors (no host read)."""
    tb = struct.unpack("<q", struct.pack("<d", t))[0]
    low = (1 << 52) - 1

    def halvings(s):
        sb = s.view(torch.int64)
        return (sb >> 52) - (tb >> 52) + ((sb & low) > (tb & low)).long()

    forever = torch.full((), K_FOREVER, dtype=torch.int64, device=s0.device)
    k_big = torch.where(s1 < math.inf, (halvings(s1) + 64).clamp_min(0), forever)
    k = torch.where(s0 <= t, 0, torch.where(s0 < math.inf, halvings(s0), k_big))
    return torch.where(torch.isnan(s0), 0, k).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _fp16_tables(device: torch.device):
    """[12, 1024] float64 tables h^r(m) (r = 0..11 halvings with round-half-even) of the
    significands m = f | 1024 (normal fp16) and m = f (subnormal), f = 0..1023."""
    f = torch.arange(1024, dtype=torch.int64)
    r = torch.arange(12, dtype=torch.int64)[:, None]
    out = []
    for m in (f | 1024, f):
        mask = (1 << r) - 1
        out.append(((m >> r) + (((m & mask) + ((m >> 1) & mask)) >> r)).double().to(device))
    return out


def _count_fp16(x: Tensor, t: float) -> Tensor:
    u = x.reshape(-1).view(torch.int16).to(torch.int32) & 0x7FFF
    # a fixed-size histogram (bincount would read max(u) on the host: a sync on CUDA)
    hist = torch.zeros(32768, dtype=torch.float64, device=x.device).index_add_(
        0, u, torch.ones(u.shape, dtype=torch.float64, device=x.device))
    table_normal, table_sub = _fp16_tables(x.device)
    h = hist[:31744].view(31, 1024)  # classes E = 0..30 (E = 0: subnormal)
    per_class = torch.cat([h[:1] @ table_sub.t(), h[1:] @ table_normal.t()])  # [31, 12]
    j = torch.arange(64, device=x.device)[:, None]
    e = (torch.arange(31, device=x.device) - 1).clamp_min(0)[None, :]
    d = e - j  # exact halvings left for class E at step j (negative: -rounded halvings)
    exact = per_class[:, 0][None, :] * torch.pow(2.0, d.clamp_min(0).double())
    rounded = per_class[torch.arange(31, device=x.device)[None, :], (-d).clamp(0, 11)]
    sums = torch.where(d >= 0, exact, torch.where(-d <= 11, rounded, 0.0)).sum(1)
    t16 = (sums * 2.0 ** -24).float().half().float()
    k = (t16 > t).sum().to(torch.int32)
    has_nan = hist[0x7C01:].sum() > 0
    k = torch.where(hist[0x7C00] > 0, 0 if t == math.inf else K_FOREVER, k)
    return torch.where(has_nan, 0, k).to(torch.int32)


def torch_count(x: Tensor, t: float) -> Tensor:
    """The halving count of ``x`` (any shape) for a threshold ``t`` already in x's dtype."""
    if x.dtype == torch.float16:
        return _count_fp16(x, t)
    return _count_by_sum(x, t)


# ---------------------------------------------------------------------------- the scaling
def halve_bits(x: Tensor, k: Tensor) -> Tensor:
    """x halved k times element by element exactly like ``x /= 2`` k times (k: int32 0-dim
    tensor on x's device). Same integer formula as ``kernels.halve._halve_bits``."""
    P, emax, bits_dtype = _FORMAT[x.dtype]
    wide = torch.int64 if P == 52 else torch.int32
    u = x.view(bits_dtype).to(wide)
    if bits_dtype == torch.int16:
        u = u & 0xFFFF
    mag = u & {23: 0x7FFFFFFF, 52: 0x7FFFFFFFFFFFFFFF}.get(P, 0x7FFF)
    sign = u ^ mag
    E = mag >> P
    e = (E - 1).clamp_min(0)
    m = torch.where(E > 0, (mag & ((1 << P) - 1)) | (1 << P), mag)
    k = k.to(wide)
    r = (k - e).clamp(0, 62 if P == 52 else 30)
    M = (torch.ones_like(r) << r) - 1
    sub = (m >> r) + (((m & M) + ((m >> 1) & M)) >> r)
    res = torch.where(k <= e, mag - (k.clamp(max=2047) << P), sub)
    res = torch.where(E == emax, mag, res)
    return (sign | res).to(bits_dtype).view(x.dtype)


def _cpu_halve(x: Tensor, t: float) -> Tuple[Tensor, Tensor]:
    """fp32/bf16/fp64 on CPU: the same rules with host reads (free there) and, when no
    result can be subnormal, one multiply instead of the bit formula."""
    a = x.abs()
    s0 = float(a.sum())  # torch's own sum in x's dtype: what the seed's comparison sees
    s1 = float((a * 2.0 ** -64).sum()) if s0 == math.inf else 0.0
    kk = count_from_sums(s0, s1, t)
    k = torch.tensor(kk, dtype=torch.int32)
    if kk == 0:
        return x.clone(), k
    if kk <= 126 and float(a.amin()) >= torch.finfo(x.dtype).tiny * 2.0 ** kk:
        return x * 2.0 ** -kk, k
    return halve_bits(x, k), k


def scale_grad(g: Tensor, k: Tensor) -> Tensor:
    """g * 2**-k (0 for k = K_FOREVER), exact unless the product is subnormal."""
    if g.dtype == torch.float64:
        k = k.to(torch.int64)
        k1 = k.clamp(max=1022)
        k2 = (k - k1).clamp(max=1022)
        return g * ((1023 - k1) << 52).view(torch.float64) * ((1023 - k2) << 52).view(
            torch.float64)
    k = k.to(torch.int32)
    k1 = k.clamp(max=126)
    k2 = (k - k1).clamp(max=126)
    p1 = ((127 - k1) << 23).view(torch.float32)
    p2 = ((127 - k2) << 23).view(torch.float32)
    return (g.float() * p1 * p2).to(g.dtype)


# ------------------------------------------------------------------------------ the op
def _impl(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    t = threshold_in(x.dtype, threshold)
    x = x.contiguous()  # y is returned contiguous, as the fake kernel promises
    if use_triton(x):
        flat = x.reshape(-1)
        y, k = kernels.halve_until(flat.contiguous(), t)
        return y.view(x.shape), k
    if x.device.type == "cpu" and x.dtype != torch.float16:
        return _cpu_halve(x, t)
    k = torch_count(x, t)
    return halve_bits(x, k), k


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


class HalveUntilFunction(torch.autograd.Function):
    """(y, k) = halve_until(x, threshold); dy/dx = 2**-k (k is piecewise constant in x)."""

    @staticmethod
    def forward(ctx, x, threshold):
        y, k = call(op, _impl, x, threshold)
        _setup_context(ctx, (x, threshold), (y, k))
        return y, k

    backward = staticmethod(_backward)


op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- entry point
def checks_enabled() -> bool:
    """``FASTLAYERS_CHECK=1`` (read at every call): opt-in checks that may sync."""
    return os.environ.get("FASTLAYERS_CHECK", "0").strip() not in ("", "0")


def validate_threshold(opname: str, dtype: torch.dtype, threshold) -> float:
    """The threshold rounded to ``dtype``; a clear error for values the loop cannot use."""
    if isinstance(threshold, (torch.Tensor, bool)) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{opname}: threshold must be a Python float (a tensor threshold "
                        f"would need a device-to-host sync), got {type(threshold).__name__}")
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"{opname}: threshold must be >= 0 (with {threshold} the seed's loop "
                         f"`while x.abs().sum() > threshold` never ends or never starts)")
    t = threshold_in(dtype, threshold)
    if t < torch.finfo(dtype).tiny:
        raise ValueError(
            f"{opname}: threshold {threshold} is {t} in {dtype}, below its smallest normal "
            f"number {torch.finfo(dtype).tiny}; sums that small do not halve exactly, so the "
            f"loop count is not defined by one reduction. Use a threshold >= "
            f"{torch.finfo(dtype).tiny}")
    return threshold


def raise_if_forever(opname: str, k: Tensor) -> None:
    """Under FASTLAYERS_CHECK=1 in eager mode: a clear error for an input holding ±inf
    (reads k on the host: a sync on CUDA)."""
    if not torch.compiler.is_compiling() and checks_enabled() and int(k) == K_FOREVER:
        raise ValueError(
            f"{opname}: the input holds ±inf, so the seed's loop `while x.abs().sum() > "
            f"threshold: x /= 2` would never end (FASTLAYERS_CHECK=1 turns this into an "
            f"error; without it the loop's limit is returned: finite elements become 0, "
            f"±inf stays)")


def halve_until(x: Tensor, threshold=1.0, return_count: bool = False):
    """See :func:`fastlayers.functional.halve_until`."""
    opname = "halve_until"
    check_float(opname, "input", x)
    threshold = validate_threshold(opname, x.dtype, threshold)
    if needs_grad(x):
        y, k = HalveUntilFunction.apply(x, threshold)
    else:
        y, k = call(op, _impl, x, threshold)
    raise_if_forever(opname, k)
    return (y, k) if return_count else y
