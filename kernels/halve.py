"""The seed's ``while x.abs().sum() > t: x /= 2`` without a device-to-host sync.

Halving is exact in binary floating point until a result is subnormal, so the loop ends in
``x`` halved ``k`` times, where ``k`` follows from one |x|-sum. Three launches, none waiting
on the host:

1. ``_halve_partials_kernel``: one row of partial sums per program (see ``NPART``).
2. ``_halve_count_kernel`` (one program): the partials -> ``k`` (int32 in device memory).
3. ``_halve_scale_kernel``: every element halved ``k`` times, bit-exactly like the loop:
   a subnormal result is rounded at every halving (``_halve_bits``), as ``x /= 2`` does.

How ``k`` is found (``t`` = the threshold rounded to x's dtype, as torch's comparison does):

* fp32 / bf16: ``s`` = fp32 sum of |x| (this kernel's order), rounded to x's dtype;
  ``k = min{j >= 0 : s * 2**-j <= t}``, read from the exponents and mantissas of ``s`` and
  ``t``. When ``s`` overflows to inf but every element is finite, the sum of |x| * 2**-64
  (which cannot overflow) takes its place with 64 added to ``k``.
* fp16: every fp16 value is an integer N of quanta 2**-24, so the loop's sum after j
  halvings, sum_i h^j(N_i), is computed EXACTLY for all j from per-bit counts:
  h^j(N) = (N >> j) + carry_j(N), where carry_j(N) is bit j of the carry vector of
  N + (N >> 1) (repeated round-half-even halving is an addition's carry chain).
  This matters for fp16: elements reach the subnormal range (< 2**-14) after a few
  halvings, and their per-step rounding moves the sum. Each sum is then rounded once to
  fp32 and once to fp16, as torch's fp32-accumulated fp16 sum is.
* NaN anywhere: ``k = 0`` (the seed's ``NaN > t`` is False: it stops at once).
* ±inf anywhere (and no NaN): the seed's loop never ends. ``k = K_FOREVER`` and the scale
  kernel returns the loop's limit: finite elements become zeros of their sign, ±inf stays.
"""
import struct

import torch
import triton
import triton.language as tl

from .runtime import device_guard

K_FOREVER = 2 ** 31 - 1  # "the loop never ends" (an input holds ±inf)
K_FOREVER_C = tl.constexpr(K_FOREVER)
# Partials row: [sum |x| (fp32), sum |x| * 2**-64 (fp32), sum x (fp32, only for
# SIGNED), 64 counts of each bit of N, 64 counts of each bit of the carries of N + N>>1]
# (the counts only for fp16).
NPART = 3 + 64 + 64
FMT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_TWO_M64 = 2.0 ** -64
FMAX = tl.constexpr(3.4028234663852886e+38)  # largest finite fp32: x > FMAX means +inf
_QUANTUM16 = 2.0 ** -24


@triton.jit
def _load_bits(bits_ptr, offs, mask, FMT: tl.constexpr):
    """Raw bits of x as non-negative int32 for 16-bit formats (int32 as is for fp32)."""
    u = tl.load(bits_ptr + offs, mask=mask, other=0)
    if FMT != 0:
        u = u.to(tl.int32) & 0xFFFF
    return u


@triton.jit
def _magnitude_bits(u, FMT: tl.constexpr):
    if FMT == 0:
        return u & 0x7FFFFFFF
    else:
        return u & 0x7FFF


@triton.jit
def _to_f32(u, FMT: tl.constexpr):
    """The value of bits ``u`` (fp32/fp16/bf16) as fp32, exactly, by integer decoding
    (the interpreter cannot compute on bf16 values)."""
    if FMT == 0:
        return u.to(tl.float32, bitcast=True)
    elif FMT == 2:
        return (u << 16).to(tl.float32, bitcast=True)
    else:
        s = (u & 0x8000) << 16
        E = (u >> 10) & 0x1F
        f = u & 0x3FF
        normal = s | (tl.where(E == 31, 255, E + 112) << 23) | (f << 13)
        sub = f.to(tl.float32) * 5.9604644775390625e-08  # f * 2**-24, exact
        return tl.where(E == 0, tl.where(s != 0, -sub, sub), normal.to(tl.float32, bitcast=True))


@triton.jit
def _block_partials(u, mask, row_ptr, FMT: tl.constexpr, SIGNED: tl.constexpr,
                    EXACT16: tl.constexpr):
    """Write one partials row for the elements with bits ``u`` (masked lanes ignored)."""
    mag = _magnitude_bits(u, FMT)
    a = tl.where(mask, _to_f32(mag, FMT), 0.0)
    tl.store(row_ptr, tl.sum(a, axis=0))
    tl.store(row_ptr + 1, tl.sum(a * 5.421010862427522e-20, axis=0))  # 2**-64
    if SIGNED:
        tl.store(row_ptr + 2, tl.sum(tl.where(mask, _to_f32(u, FMT), 0.0), axis=0))
    if EXACT16:
        E = mag >> 10
        f = mag & 0x3FF
        m = tl.where(E == 0, f, f | 0x400).to(tl.int64)
        n = tl.where(mask & (E < 31), m << tl.maximum(E - 1, 0).to(tl.int64), 0)
        q = n ^ (n >> 1) ^ (n + (n >> 1))  # carry into each bit of n + (n >> 1)
        b = tl.arange(0, 64).to(tl.int64)
        cn = tl.sum(((n[:, None] >> b[None, :]) & 1).to(tl.int32), axis=0)
        cq = tl.sum(((q[:, None] >> b[None, :]) & 1).to(tl.int32), axis=0)
        tl.store(row_ptr + 3 + b, cn.to(tl.float32))
        tl.store(row_ptr + 67 + b, cq.to(tl.float32))


@triton.jit
def _halve_partials_kernel(bits_ptr, part_ptr, n, FMT: tl.constexpr, SIGNED: tl.constexpr,
                           EXACT16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = _load_bits(bits_ptr, offs, mask, FMT)
    _block_partials(u, mask, part_ptr + pid.to(tl.int64) * 131, FMT, SIGNED, EXACT16)


@triton.jit
def _round_bf16(s):
    """fp32 -> nearest bf16 (ties to even), returned as fp32 (NaN stays NaN)."""
    b = s.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(s != s, s, r.to(tl.float32, bitcast=True))


@triton.jit
def _halvings(s, tb):
    """min{j : s * 2**-j <= t} (may be negative) for positive normal fp32 s and t, where
    tb is the int32 bit pattern of t."""
    sb = s.to(tl.int32, bitcast=True)
    return (sb >> 23) - (tb >> 23) + ((sb & 0x7FFFFF) > (tb & 0x7FFFFF)).to(tl.int32)


@triton.jit
def _pow2(e):
    """2.0**e as fp32 for integer -126 <= e <= 127."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _halve_count_kernel(part_ptr, k_ptr, out_ptr, P, t, t_bits, ROW: tl.constexpr,
                        FMT: tl.constexpr, EXACT16: tl.constexpr, SUM: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """k from P partials rows of ROW floats; with SUM also out = (sum x rounded to x's
    dtype) * 2**-k. t: the threshold (fp32), t_bits: its int32 bit pattern."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    b = tl.arange(0, 64)
    cn = tl.zeros([64], dtype=tl.float64)
    cq = tl.zeros([64], dtype=tl.float64)
    for start in range(0, P, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        ok = rows < P
        row = part_ptr + rows * ROW
        s0 += tl.sum(tl.load(row, mask=ok, other=0.0), axis=0)
        s1 += tl.sum(tl.load(row + 1, mask=ok, other=0.0), axis=0)
        if SUM:
            s2 += tl.sum(tl.load(row + 2, mask=ok, other=0.0), axis=0)
        if EXACT16:
            cn += tl.sum(tl.load(row[:, None] + 3 + b[None, :], mask=ok[:, None],
                                 other=0.0).to(tl.float64), axis=0)
            cq += tl.sum(tl.load(row[:, None] + 67 + b[None, :], mask=ok[:, None],
                                 other=0.0).to(tl.float64), axis=0)
    if EXACT16:
        # sum_i h^j(N_i) = sum_{b >= j} count_b * 2**(b - j) + carries_j, exact in fp64
        j = b[:, None]
        bb = b[None, :]
        pw = tl.where(bb >= j, ((bb - j + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True),
                      0.0)
        total = tl.sum(cn[None, :] * pw, axis=1) + cq
        t16 = (total * 5.9604644775390625e-08).to(tl.float32).to(tl.float16).to(tl.float32)
        k = tl.sum((t16 > t).to(tl.int32), axis=0)
        k = tl.where(s0 > FMAX, tl.where(t > FMAX, 0, K_FOREVER_C), k)
        k = tl.where(s0 != s0, 0, k)
    else:
        if FMT == 2:
            s0 = _round_bf16(s0)
            s1 = _round_bf16(s1)
        k_big = tl.where(s1 <= FMAX, tl.maximum(_halvings(s1, t_bits) + 64, 0), K_FOREVER_C)
        k = tl.where(s0 <= t, 0, tl.where(s0 <= FMAX, _halvings(s0, t_bits), k_big))
        k = tl.where(s0 != s0, 0, k)
    tl.store(k_ptr, k)
    if SUM:
        if FMT == 2:
            s2 = _round_bf16(s2)
        k1 = tl.minimum(k, 126)
        k2 = tl.minimum(k - k1, 126)
        scaled = s2 * _pow2(-k1) * _pow2(-k2)
        tl.store(out_ptr, tl.where(k == K_FOREVER_C, s2, scaled).to(out_ptr.dtype.element_ty))


@triton.jit
def _halve_bits(u, k, FMT: tl.constexpr):
    """Bits of x halved k times with round-half-even at every step, like ``x /= 2`` k times.

    With x = m * 2**e quanta (m the significand with its implicit bit): while e >= k every
    halving is exact (the exponent drops by k); past that the r = k - e remaining roundings
    of the integer m give (m >> r) + (((m & M) + ((m >> 1) & M)) >> r), M = 2**r - 1.
    ±inf and NaN are returned unchanged.
    """
    P: tl.constexpr = 23 if FMT == 0 else (10 if FMT == 1 else 7)
    EMAX: tl.constexpr = 31 if FMT == 1 else 255
    mag = _magnitude_bits(u, FMT)
    sign = u ^ mag
    E = mag >> P
    e = tl.maximum(E - 1, 0)
    m = tl.where(E > 0, (mag & ((1 << P) - 1)) | (1 << P), mag)
    r = tl.minimum(tl.maximum(k - e, 0), 30)
    M = (1 << r) - 1
    sub = (m >> r) + (((m & M) + ((m >> 1) & M)) >> r)
    res = tl.where(k <= e, mag - (tl.minimum(k, 255) << P), sub)
    res = tl.where(E == EMAX, mag, res)
    return sign | res


@triton.jit
def _halve_scale_kernel(bits_ptr, out_ptr, k_ptr, n, FMT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(k_ptr)
    u = _load_bits(bits_ptr, offs, mask, FMT)
    tl.store(out_ptr + offs, _halve_bits(u, k, FMT).to(out_ptr.dtype.element_ty), mask=mask)


def _block(dtype):
    return 256 if dtype == torch.float16 else 1024


def halve_count(x_flat, threshold_d, partials=None, row=NPART):
    """k (int32, 0-dim, on x's device) for a contiguous fp32/fp16/bf16 tensor.

    threshold_d: the threshold already rounded to x's dtype (a positive normal number or
    inf). partials: optional precomputed [P, row] fp32 partials of x (fp32/bf16 only need
    the first two columns; fp16 needs all NPART).
    """
    k = torch.empty((), device=x_flat.device, dtype=torch.int32)
    if partials is None:
        partials, row = halve_partials(x_flat.view(-1)), NPART
    _launch_count(partials, row, k, k, threshold_d, x_flat.dtype, False)
    return k


def halve_partials(x_flat, signed=False):
    """[P, NPART] fp32 partials of a contiguous 1-D tensor (P = number of programs);
    signed: also the plain sum (column 2), for :func:`count_and_sum`."""
    n = x_flat.numel()
    block = _block(x_flat.dtype)
    P = triton.cdiv(n, block)
    part = torch.empty((P, NPART), device=x_flat.device, dtype=torch.float32)
    if P:
        with device_guard(x_flat):
            _halve_partials_kernel[(P,)](
                x_flat.view(BITS_DTYPE[x_flat.dtype]), part, n, FMT=FMT[x_flat.dtype],
                SIGNED=signed, EXACT16=x_flat.dtype == torch.float16, BLOCK=block, num_warps=8)
    return part


def _f32_bits(value):
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _launch_count(partials, row, k, out, threshold_d, dtype, signed_sum):
    with device_guard(partials):
        _halve_count_kernel[(1,)](
            partials, k, out, partials.shape[0], float(threshold_d), _f32_bits(threshold_d),
            ROW=row, FMT=FMT[dtype],
            EXACT16=dtype == torch.float16, SUM=signed_sum, BLOCK_P=64, num_warps=4)


def count_and_sum(partials, threshold_d, dtype, row=NPART):
    """(k, out): k as in :func:`halve_count`, out = the seed's ``X.sum()`` after halving,
    i.e. (sum x, fp32-accumulated, rounded to ``dtype``) * 2**-k, from SIGNED partials of
    an fp32 or bf16 tensor."""
    k = torch.empty((), device=partials.device, dtype=torch.int32)
    out = torch.empty((), device=partials.device, dtype=dtype)
    _launch_count(partials, row, k, out, threshold_d, dtype, True)
    return k, out


def halve_scale(x_flat, k, out=None):
    """x halved k times (k: int32 0-dim device tensor), element by element, bit-exactly;
    ``out`` may be ``x_flat`` itself (in place)."""
    out = torch.empty_like(x_flat) if out is None else out
    n = x_flat.numel()
    if n:
        bits = BITS_DTYPE[x_flat.dtype]
        with device_guard(x_flat):
            _halve_scale_kernel[(triton.cdiv(n, 1024),)](
                x_flat.view(bits), out.view(bits), k, n, FMT=FMT[x_flat.dtype], BLOCK=1024,
                num_warps=4)
    return out


def halve_until(x_flat, threshold_d):
    """(y, k): the loop's result and its halving count for a contiguous 1-D tensor."""
    k = halve_count(x_flat, threshold_d)
    return halve_scale(x_flat, k), k
