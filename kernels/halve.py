"""The seed's ``while x.abs().sum() > t: x /= 2`` without a device-to-host sync.

The count rule is the one of ``fastlayers.ops.halve_until`` (its docstring): k =
#{j >= 0 : S_j > t}, S_j the sum of |x| halved j times element by element. Three launches,
none waiting on the host:

1. ``_halve_partials_kernel``: one row of partials per program (columns ``COL_*``).
2. ``_halve_count_kernel`` (one program): the rows -> ``k`` (int32 in device memory).
3. ``_halve_scale_kernel``: every element halved ``k`` times, bit-exactly like the loop.

How the count kernel evaluates the rule (``t`` = the threshold rounded to x's dtype):

* fp32 / bf16: ``S_0`` = this kernel's fp32 sum of |x| (rounded to bf16 for bf16) gives
  k0 from the exponents and mantissas of ``S_0`` and ``t``. If an element rounds within
  k0 halvings (the smallest trailing-zero count of any element, in units of the smallest
  subnormal, is below k0) or ``S_0`` overflowed, the window of sums S_j around k0
  (``fastlayers.ops.halve_until.window_below``) is evaluated by re-reading x in the count
  program; rare for these formats (an element must reach the subnormal range).
* fp16: elements reach the subnormal range (< 2**-14) after a few halvings, so rounding
  is the common case, and a one-program window pass would be slow. Instead every fp16
  |x| is an integer N of quanta 2**-24 with N < 2**40, so S_j is computed EXACTLY for all
  j from per-bit counts in the partials pass: h^j(N) = (N >> j) + carry_j(N), carry_j(N)
  bit j of the carry vector of N + (N >> 1) (repeated round-half-even halving is that
  addition's carry chain); each S_j is rounded once to fp32 and once to fp16. fp32/bf16
  magnitudes span 277/261 bits: too many columns, hence the window for them.
* NaN anywhere: ``k = 0``. ±inf anywhere (and no NaN): ``k = K_FOREVER`` and the scale
  kernel returns the loop's limit: finite elements become zeros of their sign, ±inf stays.
"""
import struct

import torch
import triton
import triton.language as tl

from .runtime import device_guard

K_FOREVER = torch.iinfo(torch.int32).max  # "the loop never ends" (an input holds ±inf)
FMT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SCALE_DOWN = tl.constexpr(64)  # overflow fallback: sum |x| * 2**-64 (finite for finite x)
_K_FOREVER = tl.constexpr(K_FOREVER)
_TWO_M_SCALE = tl.constexpr(2.0 ** -SCALE_DOWN.value)
_FMAX = tl.constexpr(torch.finfo(torch.float32).max)  # s > _FMAX means s = +inf
_NO_ROUNDING = tl.constexpr(1 << 20)  # trailing zeros of 0, ±inf, NaN: more than any k0

# Columns of a partials row (constexpr: the kernels index with them; .value on the host).
# The fused FixedHiddenMLP kernel writes the first SUM_COLS.
COL_ABS = tl.constexpr(0)  # sum |x| (fp32)
COL_ABS_SCALED = tl.constexpr(1)  # sum |x| * 2**-SCALE_DOWN
COL_SIGNED = tl.constexpr(2)  # sum x (only for SIGNED partials)
COL_ZMIN = tl.constexpr(3)  # least trailing-zero count (exact halvings) of any element
SUM_COLS = tl.constexpr(4)
FP16_BITS = tl.constexpr(64)  # N < 2**40 and the carries of N + (N >> 1) fit one int64
COL_BITS = tl.constexpr(SUM_COLS.value)  # FP16_BITS counts of each bit of N
COL_CARRIES = tl.constexpr(COL_BITS.value + FP16_BITS.value)  # ... of each carry bit
NPART = tl.constexpr(COL_CARRIES.value + FP16_BITS.value)


@triton.jit
def _format(FMT: tl.constexpr):
    """(fraction bits, all-ones biased exponent) of fp32 (0), fp16 (1), bf16 (2)."""
    if FMT == 0:
        return 23, 255
    elif FMT == 1:
        return 10, 31
    else:
        return 7, 255


@triton.jit
def _load_bits(bits_ptr, offs, mask, FMT: tl.constexpr):
    """Raw bits of x as non-negative int32 (16-bit formats in the low half)."""
    u = tl.load(bits_ptr + offs, mask=mask, other=0)
    if FMT != 0:
        u = u.to(tl.int32) & 0xFFFF
    return u


@triton.jit
def _magnitude_bits(u, FMT: tl.constexpr):
    P, EMAX = _format(FMT)
    return u & ((EMAX << P) | ((1 << P) - 1))


@triton.jit
def _to_f32(u, FMT: tl.constexpr):
    """The value of bits ``u`` as fp32, exactly, by integer decoding (the interpreter
    cannot compute on bf16 values)."""
    if FMT == 0:
        return u.to(tl.float32, bitcast=True)
    elif FMT == 2:
        return (u << 16).to(tl.float32, bitcast=True)
    else:  # fp16: rebias the exponent (15 -> 127); subnormals are f * 2**-24
        s = (u & 0x8000) << 16
        E = (u >> 10) & 0x1F
        f = u & 0x3FF
        normal = s | (tl.where(E == 31, 255, E + (127 - 15)) << 23) | (f << 13)
        sub = f.to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        return tl.where(E == 0, tl.where(s != 0, -sub, sub), normal.to(tl.float32, bitcast=True))


@triton.jit
def _significand(mag, FMT: tl.constexpr):
    """(m, e): |x| = m * 2**e quanta (m with its implicit bit, e = max(E - 1, 0))."""
    P, EMAX = _format(FMT)
    E = mag >> P
    m = tl.where(E > 0, (mag & ((1 << P) - 1)) | (1 << P), mag)
    return m, tl.maximum(E - 1, 0)


@triton.jit
def _trailing_zeros(mag, FMT: tl.constexpr):
    """Halvings of |x| that stay exact: trailing zero bits of its integer of quanta
    (_NO_ROUNDING for 0, ±inf, NaN)."""
    P, EMAX = _format(FMT)
    m, e = _significand(mag, FMT)
    lowest = (m & -m).to(tl.float32).to(tl.int32, bitcast=True)  # a power of two < 2**24
    z = (lowest >> 23) - 127 + e
    return tl.where((m == 0) | ((mag >> P) == EMAX), _NO_ROUNDING, z)


@triton.jit
def _halve_bits(u, k, FMT: tl.constexpr):
    """Bits of x halved k times, rounded half to even at every step like ``x /= 2`` (the
    formula of ``fastlayers.ops.halve_until.halve_bits``). ±inf and NaN are unchanged."""
    P, EMAX = _format(FMT)
    mag = _magnitude_bits(u, FMT)
    m, e = _significand(mag, FMT)
    r = tl.minimum(tl.maximum(k - e, 0), P + 2)  # r >= P + 2 rounds every m to 0
    M = (1 << r) - 1
    sub = (m >> r) + (((m & M) + ((m >> 1) & M)) >> r)
    res = tl.where(k <= e, mag - (tl.minimum(k, EMAX) << P), sub)
    return (u ^ mag) | tl.where((mag >> P) == EMAX, mag, res)


@triton.jit
def _write_partials(row_ptr, u, mask, FMT: tl.constexpr, SIGNED: tl.constexpr,
                    EXACT16: tl.constexpr):
    """One partials row for the elements with bits ``u`` (2-D block; masked lanes ignored)."""
    mag = _magnitude_bits(u, FMT)
    a = tl.where(mask, _to_f32(mag, FMT), 0.0)
    tl.store(row_ptr + COL_ABS, tl.sum(tl.sum(a, axis=1), axis=0))
    tl.store(row_ptr + COL_ABS_SCALED, tl.sum(tl.sum(a * _TWO_M_SCALE, axis=1), axis=0))
    if SIGNED:
        v = tl.where(mask, _to_f32(u, FMT), 0.0)
        tl.store(row_ptr + COL_SIGNED, tl.sum(tl.sum(v, axis=1), axis=0))
    z = tl.where(mask, _trailing_zeros(mag, FMT), _NO_ROUNDING)
    tl.store(row_ptr + COL_ZMIN, tl.min(tl.min(z, axis=1), axis=0).to(tl.float32))
    if EXACT16:
        m, e = _significand(mag, FMT)
        n = tl.where(mask & ((mag >> 10) < 31), m.to(tl.int64) << e.to(tl.int64), 0)
        n = tl.reshape(n, [n.numel])
        q = n ^ (n >> 1) ^ (n + (n >> 1))  # carry into each bit of n + (n >> 1)
        b = tl.arange(0, FP16_BITS).to(tl.int64)
        tl.store(row_ptr + COL_BITS + b,
                 tl.sum(((n[:, None] >> b[None, :]) & 1).to(tl.int32), axis=0).to(tl.float32))
        tl.store(row_ptr + COL_CARRIES + b,
                 tl.sum(((q[:, None] >> b[None, :]) & 1).to(tl.int32), axis=0).to(tl.float32))


@triton.jit
def _halve_partials_kernel(bits_ptr, part_ptr, n, FMT: tl.constexpr, SIGNED: tl.constexpr,
                           EXACT16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = _load_bits(bits_ptr, offs, mask, FMT)
    _write_partials(part_ptr + pid.to(tl.int64) * NPART, u[None, :], mask[None, :], FMT,
                    SIGNED, EXACT16)


@triton.jit
def _round_bf16(s):
    """fp32 -> nearest bf16 (ties to even), returned as fp32 (NaN stays NaN)."""
    b = s.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(s != s, s, r.to(tl.float32, bitcast=True))


@triton.jit
def _halvings(s, tb):
    """min{j : s * 2**-j <= t} (may be negative) for positive normal fp32 s and t; tb is
    t's int32 bit pattern."""
    sb = s.to(tl.int32, bitcast=True)
    return (sb >> 23) - (tb >> 23) + ((sb & 0x7FFFFF) > (tb & 0x7FFFFF)).to(tl.int32)


@triton.jit
def _pow2(e):
    """2.0**e as fp32 for integer -126 <= e <= 127."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _window_below(n, t):
    """D of ``fastlayers.ops.halve_until.window_below``: 2**(D+1) >= 1.02 + 1.01 n q / t,
    q = 2**-149 (fp32; bf16's q is larger, passed scaled in ``t``)."""
    r = 1.02 + 1.01 * n.to(tl.float32) * (1.401298464324817e-45 / t)
    rb = r.to(tl.int32, bitcast=True)
    return tl.maximum((rb >> 23) - 127 + ((rb & 0x7FFFFF) != 0).to(tl.int32) - 1, 0)


@triton.jit
def _halve_count_kernel(part_ptr, bits_ptr, k_ptr, out_ptr, P, n, t, t_bits, t_window,
                        ROW: tl.constexpr, FMT: tl.constexpr, EXACT16: tl.constexpr,
                        SUM: tl.constexpr, WINDOW: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK: tl.constexpr):
    """k from P partials rows of ROW floats (vector accumulators, one reduction at the
    end: no barrier per iteration); WINDOW: re-read x's n elements at ``bits_ptr`` when an
    element rounds. SUM: also out = (sum x rounded to x's dtype) * 2**-k. t: the threshold
    (fp32), t_bits: its bits; t_window: t * 2**-149 / q (q: x's smallest subnormal)."""
    acc0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    zmin = tl.full([BLOCK_P], _NO_ROUNDING, dtype=tl.float32)
    b = tl.arange(0, FP16_BITS)
    cn = tl.zeros([BLOCK_P, FP16_BITS], dtype=tl.float64)
    cq = tl.zeros([BLOCK_P, FP16_BITS], dtype=tl.float64)
    for start in range(0, P, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        ok = rows < P
        row = part_ptr + rows * ROW
        acc0 += tl.load(row + COL_ABS, mask=ok, other=0.0)
        acc1 += tl.load(row + COL_ABS_SCALED, mask=ok, other=0.0)
        zmin = tl.minimum(zmin, tl.load(row + COL_ZMIN, mask=ok, other=_NO_ROUNDING))
        if SUM:
            acc2 += tl.load(row + COL_SIGNED, mask=ok, other=0.0)
        if EXACT16:
            cn += tl.load(row[:, None] + COL_BITS + b[None, :], mask=ok[:, None],
                          other=0.0).to(tl.float64)
            cq += tl.load(row[:, None] + COL_CARRIES + b[None, :], mask=ok[:, None],
                          other=0.0).to(tl.float64)
    s0 = tl.sum(acc0, axis=0)
    s1 = tl.sum(acc1, axis=0)
    if EXACT16:
        # S_j in quanta = sum_{b >= j} count_b * 2**(b - j) + carries_j, exact in fp64
        j = b[:, None]
        bb = b[None, :]
        pw = tl.where(bb >= j, ((bb - j + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True),
                      0.0)
        total = tl.sum(tl.sum(cn, axis=0)[None, :] * pw, axis=1) + tl.sum(cq, axis=0)
        t16 = (total * 5.9604644775390625e-08).to(tl.float32).to(tl.float16).to(tl.float32)
        k = tl.sum((t16 > t).to(tl.int32), axis=0)
        k = tl.where(s0 > _FMAX, tl.where(t > _FMAX, 0, _K_FOREVER), k)
    else:
        if FMT == 2:
            s0 = _round_bf16(s0)
            s1 = _round_bf16(s1)
        k_big = tl.where(s1 <= _FMAX, tl.maximum(_halvings(s1, t_bits) + SCALE_DOWN, 0),
                         _K_FOREVER)
        k = tl.where(s0 <= t, 0, tl.where(s0 <= _FMAX, _halvings(s0, t_bits), k_big))
        if WINDOW:
            rounds = (tl.min(zmin, axis=0) < k.to(tl.float32)) | (s0 > _FMAX)
            if rounds & (k != _K_FOREVER) & (s0 == s0):
                lo = tl.maximum(k - 1 - _window_below(n, t_window), 0)
                k = lo
                for i in range(0, _window_below(n, t_window) + 3):
                    acc = tl.zeros([BLOCK], dtype=tl.float32)
                    for st in range(0, n, BLOCK):
                        offs = st + tl.arange(0, BLOCK).to(tl.int64)
                        u = _magnitude_bits(_load_bits(bits_ptr, offs, offs < n, FMT), FMT)
                        acc += _to_f32(_halve_bits(u, lo + i, FMT), FMT)
                    s = tl.sum(acc, axis=0)
                    if FMT == 2:
                        s = _round_bf16(s)
                    k = tl.where(s > t, lo + i + 1, k)
    k = tl.where(s0 != s0, 0, k)
    tl.store(k_ptr, k)
    if SUM:
        s2 = tl.sum(acc2, axis=0)
        if FMT == 2:
            s2 = _round_bf16(s2)
        k1 = tl.minimum(k, 126)
        scaled = s2 * _pow2(-k1) * _pow2(-tl.minimum(k - k1, 126))
        tl.store(out_ptr, tl.where(k == _K_FOREVER, s2, scaled).to(out_ptr.dtype.element_ty))


@triton.jit
def _halve_scale_kernel(bits_ptr, out_ptr, k_ptr, n, FMT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(k_ptr)
    u = _load_bits(bits_ptr, offs, mask, FMT)
    tl.store(out_ptr + offs, _halve_bits(u, k, FMT).to(out_ptr.dtype.element_ty), mask=mask)


def _block(dtype):
    return 256 if dtype == torch.float16 else 1024  # fp16: [BLOCK, 64] bit-count tiles


def _f32_bits(value):
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _launch_count(partials, row, k, out, threshold_d, dtype, signed_sum, x_flat=None):
    """x_flat: the tensor the partials describe, for the window (None: no window; the
    count then assumes that no element rounds)."""
    fi = torch.finfo(dtype)
    q_ratio = 2.0 ** -149 / (fi.tiny * fi.eps)  # t * q_ratio = t * 2**-149 / q
    window = x_flat is not None and dtype != torch.float16
    with device_guard(partials):
        _halve_count_kernel[(1,)](
            partials, x_flat.view(BITS_DTYPE[dtype]) if window else partials, k, out,
            partials.shape[0], x_flat.numel() if window else 0, float(threshold_d),
            _f32_bits(threshold_d), float(threshold_d) * q_ratio, ROW=row, FMT=FMT[dtype],
            EXACT16=dtype == torch.float16, SUM=signed_sum, WINDOW=window, BLOCK_P=64,
            BLOCK=1024, num_warps=4)


def halve_partials(x_flat, signed=False):
    """[P, NPART] fp32 partials of a contiguous 1-D tensor (P = number of programs);
    signed: also the plain sum (column COL_SIGNED), for :func:`count_and_sum`."""
    n = x_flat.numel()
    block = _block(x_flat.dtype)
    P = triton.cdiv(n, block)
    part = torch.empty((P, NPART.value), device=x_flat.device, dtype=torch.float32)
    if P:
        with device_guard(x_flat):
            _halve_partials_kernel[(P,)](
                x_flat.view(BITS_DTYPE[x_flat.dtype]), part, n, FMT=FMT[x_flat.dtype],
                SIGNED=signed, EXACT16=x_flat.dtype == torch.float16, BLOCK=block, num_warps=8)
    return part


def halve_count(x_flat, threshold_d, partials=None, row=NPART.value):
    """k (int32, 0-dim, on x's device) for a contiguous 1-D fp32/fp16/bf16 tensor.

    threshold_d: the threshold already rounded to x's dtype (a positive normal number or
    inf). partials: optional precomputed [P, row] fp32 partials of x (fp32/bf16 need the
    first SUM_COLS columns; fp16 all NPART).
    """
    k = torch.empty((), device=x_flat.device, dtype=torch.int32)
    if partials is None:
        partials, row = halve_partials(x_flat), NPART.value
    _launch_count(partials, row, k, k, threshold_d, x_flat.dtype, False, x_flat)
    return k


def count_and_sum(partials, threshold_d, dtype, row=NPART.value):
    """(k, out): k as in :func:`halve_count`, out = the seed's ``X.sum()`` after halving,
    i.e. (sum x, fp32-accumulated, rounded to ``dtype``) * 2**-k, from SIGNED partials of
    an fp32 or bf16 tensor. Without x itself no window is evaluated: exact unless an
    element would round (a subnormal result) or |x|'s sum overflows."""
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
