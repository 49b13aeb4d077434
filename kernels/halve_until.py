"""The seed's ``while x.abs().sum() > t: x /= 2`` without a device-to-host sync: the Triton
side of ``fastlayers.ops.halve_until``, whose docstring states the count rule (k0 from S_0;
the window k0 - 1 - D .. k0 + 1 when an element rounds; NaN -> 0; ±inf -> K_FOREVER).
Launchers take t (the threshold in x's dtype) and the window D from the caller.

One launch when one program holds the elements (``_halve_one_kernel`` up to ONE_MAX; the
fused FixedHiddenMLP at small batch): :func:`count_in_block` evaluates the rule, window
included, in registers. Otherwise three, none waiting on the host: ``_halve_partials_kernel``
(a row of partial sums per program, columns ``COL_*``), ``_halve_count_kernel`` (one
program: rows -> k in device memory; the window by re-reading x, rare for fp32/bf16 since
an element must reach the subnormal range) and ``_halve_scale_kernel``.

fp16 in the multi-program plan takes the rule's definition itself, k = #{j : S_j > t}: fp16
elements reach the subnormal range (< 2**-14) after a few halvings, so the window is the
common case there, and one program re-reading a large x would be slow; but every finite fp16
|x| is 0 after FP16_SUMS - 1 halvings, so the partials hold every S_j (fp32/bf16 would need
277/261 columns).
"""
import struct

import torch
import triton
import triton.language as tl

from .runtime import cdiv, device_guard, next_pow2, round_bf16

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
# fp16 |x| < 2**16 is below 2**40 quanta (2**-24): 41 halvings leave 0, so S_41 > t only
# for an infinite element. fp16 rows add S_0 .. S_41 (the sums of |x| halved j times).
FP16_SUMS = tl.constexpr(42)
_SUMS_TILE = tl.constexpr(64)  # FP16_SUMS rounded up to a power of two (a tl.arange length)
COL_SUMS = tl.constexpr(SUM_COLS.value)
NPART = tl.constexpr(COL_SUMS.value + FP16_SUMS.value)
ONE_MAX = 4096  # halve_until of up to this many elements: one program, one launch
COUNT_ROWS = 1024  # partials rows per step of the count kernel's loop (fp32/bf16: 4 vectors)
COUNT_ROWS_FP16 = 64  # fp16: one [rows, _SUMS_TILE] tile of the S_j columns per step


# ------------------------------------------------------------------ element bit patterns
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
    """The value of bits ``u`` as fp32, exactly (bf16 by a shift: the interpreter cannot
    compute on bf16 values)."""
    if FMT == 0:
        return u.to(tl.float32, bitcast=True)
    elif FMT == 2:
        return (u << 16).to(tl.float32, bitcast=True)
    else:
        return u.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_to(v, FMT: tl.constexpr):
    """fp32 v rounded to the nearest value of the format (ties to even), kept in fp32."""
    if FMT == 0:
        return v
    elif FMT == 1:
        return v.to(tl.float16).to(tl.float32)
    else:
        return round_bf16(v)


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


# -------------------------------------------------------------------------- the rule
@triton.jit
def _halvings(s, tb):
    """min{j : s * 2**-j <= t} (may be negative) for positive normal fp32 s and t; tb is
    t's int32 bit pattern."""
    sb = s.to(tl.int32, bitcast=True)
    return (sb >> 23) - (tb >> 23) + ((sb & 0x7FFFFF) > (tb & 0x7FFFFF)).to(tl.int32)


@triton.jit
def _first_guess(s0, s1, t, t_bits):
    """k0: 0 when S_0 <= t, else from S_0 (already in x's dtype) or, when S_0 overflowed,
    from s1 = sum |x| * 2**-SCALE_DOWN (K_FOREVER when that overflows too: an inf)."""
    k_big = tl.where(s1 <= _FMAX, tl.maximum(_halvings(s1, t_bits) + SCALE_DOWN, 0),
                     _K_FOREVER)
    return tl.where(s0 <= t, 0, tl.where(s0 <= _FMAX, _halvings(s0, t_bits), k_big))


@triton.jit
def _window_needed(z, k, s0):
    """S_j is not S_0 * 2**-j up to j = k: an element rounds within k halvings (z: the least
    count of exact halvings, int32) or S_0 overflowed (never for k = K_FOREVER or NaN)."""
    return ((z < k) | (s0 > _FMAX)) & (k != _K_FOREVER) & (s0 == s0)


@triton.jit
def _total(a):
    """Sum of a 2-D block (fp32)."""
    return tl.sum(tl.sum(a, axis=1), axis=0)


@triton.jit
def count_in_block(u, mask, t, t_bits, D, FMT: tl.constexpr):
    """k for the elements of a 2-D block of bits ``u`` held whole by one program (lanes off
    ``mask`` ignored): the rule with its window evaluated in registers. t: the threshold in
    x's dtype (fp32), t_bits: its bits, D: ``window_below`` for the block's element count."""
    mag = tl.where(mask, _magnitude_bits(u, FMT), 0)
    a = _to_f32(mag, FMT)
    s0 = _round_to(_total(a), FMT)
    k = _first_guess(s0, _total(a * _TWO_M_SCALE), t, t_bits)
    z = tl.min(tl.min(_trailing_zeros(mag, FMT), axis=1), axis=0)
    if _window_needed(z, k, s0):
        lo = tl.maximum(k - 1 - D, 0)
        k = lo
        for i in range(0, D + 3):
            s = _round_to(_total(_to_f32(_halve_bits(mag, lo + i, FMT), FMT)), FMT)
            k = tl.where(s > t, lo + i + 1, k)
    return tl.where(s0 != s0, 0, k)


# ------------------------------------------------------------------------- the kernels
@triton.jit
def _write_partials(row_ptr, u, mask, FMT: tl.constexpr, SIGNED: tl.constexpr,
                    ALL_SUMS: tl.constexpr):
    """One partials row for the elements with bits ``u`` (2-D block; masked lanes ignored)."""
    mag = tl.where(mask, _magnitude_bits(u, FMT), 0)
    a = _to_f32(mag, FMT)
    tl.store(row_ptr + COL_ABS, _total(a))
    tl.store(row_ptr + COL_ABS_SCALED, _total(a * _TWO_M_SCALE))
    if SIGNED:
        tl.store(row_ptr + COL_SIGNED, _total(tl.where(mask, _to_f32(u, FMT), 0.0)))
    z = tl.min(tl.min(_trailing_zeros(mag, FMT), axis=1), axis=0)
    tl.store(row_ptr + COL_ZMIN, z.to(tl.float32))
    if ALL_SUMS:  # fp16: every S_j, j < FP16_SUMS (module docstring)
        for j in range(0, FP16_SUMS):
            tl.store(row_ptr + COL_SUMS + j, _total(_to_f32(_halve_bits(mag, j, FMT), FMT)))


@triton.jit
def _halve_partials_kernel(bits_ptr, part_ptr, n, FMT: tl.constexpr, SIGNED: tl.constexpr,
                           ALL_SUMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = _load_bits(bits_ptr, offs, mask, FMT)
    _write_partials(part_ptr + pid.to(tl.int64) * NPART, u[None, :], mask[None, :], FMT,
                    SIGNED, ALL_SUMS)


@triton.jit
def _halved_total(bits_ptr, n, k, FMT: tl.constexpr, SIGNED: tl.constexpr,
                  BLOCK: tl.constexpr):
    """fp32 sum of the n elements at ``bits_ptr`` halved k times: of x (SIGNED) or |x|."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for blk in range(0, n // BLOCK + 1):  # (not range(0, n, BLOCK): i32 st + BLOCK wraps)
        offs = tl.arange(0, BLOCK).to(tl.int64) + blk * BLOCK  # blk * BLOCK <= n
        u = _load_bits(bits_ptr, offs, offs < n, FMT)
        if not SIGNED:
            u = _magnitude_bits(u, FMT)
        acc += _to_f32(_halve_bits(u, k, FMT), FMT)
    return tl.sum(acc, axis=0)


@triton.jit
def _halve_count_kernel(part_ptr, bits_ptr, k_ptr, out_ptr, P, n, t, t_bits, D,
                        ROW: tl.constexpr, FMT: tl.constexpr, ALL_SUMS: tl.constexpr,
                        SUM: tl.constexpr, WINDOW: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK: tl.constexpr):
    """k from P partials rows of ROW floats (vector accumulators, one reduction at the
    end: no barrier per iteration). WINDOW: re-read x's n elements at ``bits_ptr`` when an
    element rounds (D: the window). SUM (with WINDOW): also out = the sum of x halved k
    times in x's dtype, which is (sum x) * 2**-k unless an element rounds or |x|'s sum
    overflowed; then the halved elements are re-read and added."""
    acc0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    zmin = tl.full([BLOCK_P], _NO_ROUNDING, dtype=tl.float32)
    j = tl.arange(0, _SUMS_TILE)  # the S_j columns of fp16 rows (j < FP16_SUMS)
    sums = tl.zeros([BLOCK_P, _SUMS_TILE], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        ok = rows < P
        row = part_ptr + rows * ROW
        acc0 += tl.load(row + COL_ABS, mask=ok, other=0.0)
        acc1 += tl.load(row + COL_ABS_SCALED, mask=ok, other=0.0)
        zmin = tl.minimum(zmin, tl.load(row + COL_ZMIN, mask=ok, other=_NO_ROUNDING))
        if SUM:
            acc2 += tl.load(row + COL_SIGNED, mask=ok, other=0.0)
        if ALL_SUMS:
            sums += tl.load(row[:, None] + COL_SUMS + j[None, :],
                            mask=ok[:, None] & (j < FP16_SUMS)[None, :], other=0.0)
    s0 = tl.sum(acc0, axis=0)  # fp32: +inf only when an element is (fp16 sums cannot overflow it)
    z = tl.min(zmin, axis=0).to(tl.int32)  # exact halvings of every element
    if ALL_SUMS:  # k = #{j : S_j > t}; all FP16_SUMS: S_41 > t, an infinite element
        k = tl.sum((_round_to(tl.sum(sums, axis=0), FMT) > t).to(tl.int32), axis=0)
        k = tl.where(k == FP16_SUMS, _K_FOREVER, k)
    else:
        s0 = _round_to(s0, FMT)
        k = _first_guess(s0, tl.sum(acc1, axis=0), t, t_bits)
        if WINDOW:
            if _window_needed(z, k, s0):
                lo = tl.maximum(k - 1 - D, 0)
                k = lo
                for i in range(0, D + 3):
                    s = _halved_total(bits_ptr, n, lo + i, FMT, False, BLOCK)
                    k = tl.where(_round_to(s, FMT) > t, lo + i + 1, k)
    k = tl.where(s0 != s0, 0, k)
    tl.store(k_ptr, k)
    if SUM:  # 2**-k as two normal powers (k <= 252; a larger k leaves 0 anyway)
        s2 = _round_to(tl.sum(acc2, axis=0), FMT)
        k1 = tl.minimum(k, 126)
        k2 = tl.minimum(k - k1, 126)
        out = s2 * ((127 - k1) << 23).to(tl.float32, bitcast=True) \
            * ((127 - k2) << 23).to(tl.float32, bitcast=True)
        out = tl.where(k == _K_FOREVER, s2, out)
        if _window_needed(z, k, s0):  # the halved elements themselves
            out = _halved_total(bits_ptr, n, k, FMT, True, BLOCK)
        bits = _round_to(out, FMT).to(tl.int32, bitcast=True)  # x's format: store its bits
        tl.store(out_ptr, (bits if FMT == 0 else bits >> 16).to(out_ptr.dtype.element_ty))


@triton.jit
def _halve_one_kernel(bits_ptr, out_ptr, k_ptr, n, t, t_bits, D, FMT: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The whole loop in one program for n <= BLOCK elements: k (:func:`count_in_block`)
    and the halved elements."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    u = _load_bits(bits_ptr, offs, mask, FMT)
    k = count_in_block(u[None, :], mask[None, :], t, t_bits, D, FMT)
    tl.store(k_ptr, k)
    tl.store(out_ptr + offs, _halve_bits(u, k, FMT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _halve_scale_kernel(bits_ptr, out_ptr, k_ptr, n, FMT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(k_ptr)
    u = _load_bits(bits_ptr, offs, mask, FMT)
    tl.store(out_ptr + offs, _halve_bits(u, k, FMT).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------ the launchers
def f32_bits(value: float) -> int:
    """The int32 bit pattern of ``value`` as fp32 (the kernels' ``t_bits``)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def halve_partials(x_flat, signed=False):
    """[P, NPART] fp32 partials of a contiguous 1-D tensor (P = number of programs);
    signed: also the plain sum (column COL_SIGNED), for :func:`count_and_sum`."""
    n, block = x_flat.numel(), 1024
    part = torch.empty((cdiv(n, block), NPART.value), device=x_flat.device,
                       dtype=torch.float32)
    if n:
        with device_guard(x_flat):
            _halve_partials_kernel[(part.shape[0],)](
                x_flat.view(BITS_DTYPE[x_flat.dtype]), part, n, FMT=FMT[x_flat.dtype],
                SIGNED=signed, ALL_SUMS=x_flat.dtype == torch.float16, BLOCK=block,
                num_warps=8)
    return part


def _count(partials, row, t, D, dtype, x_flat=None, out=None):
    """k (int32 0-dim); also ``out`` = the halved sum when given (SIGNED partials, x_flat
    given). x_flat: the tensor the partials describe, for the window (None: no window)."""
    k = torch.empty((), device=partials.device, dtype=torch.int32)
    fp16 = dtype == torch.float16
    window = x_flat is not None and not fp16
    with device_guard(partials):
        _halve_count_kernel[(1,)](
            partials, x_flat.view(BITS_DTYPE[dtype]) if window else partials, k,
            k if out is None else out.view(BITS_DTYPE[dtype]), partials.shape[0],
            x_flat.numel() if window else 0,
            float(t), f32_bits(t), D, ROW=row, FMT=FMT[dtype], ALL_SUMS=fp16,
            SUM=out is not None, WINDOW=window, BLOCK_P=COUNT_ROWS_FP16 if fp16 else COUNT_ROWS,
            BLOCK=1024, num_warps=4 if fp16 else 8)
    return k


def halve_count(x_flat, t, D, partials=None, row=NPART.value):
    """k (int32, 0-dim, on x's device) for a contiguous 1-D fp32/fp16/bf16 tensor.

    t: the threshold already in x's dtype (a positive normal number or inf); D: the window
    (``window_below(numel, dtype, t)``). partials: optional precomputed [P, row] fp32
    partials of x (fp32/bf16 need the first SUM_COLS columns; fp16 all NPART).
    """
    if partials is None:
        partials, row = halve_partials(x_flat), NPART.value
    return _count(partials, row, t, D, x_flat.dtype, x_flat=x_flat)


def count_and_sum(partials, x_flat, t, D, row=NPART.value):
    """(k, out) for a contiguous 1-D fp32 or bf16 tensor x_flat and its SIGNED partials:
    k as in :func:`halve_count`, out = the seed's ``X.sum()`` after halving (the halved
    elements added in fp32, rounded to x's dtype): (sum x) * 2**-k from the partials, or,
    when an element rounds or |x|'s sum overflowed, the halved elements re-read (rare).
    Neither x nor a halved copy is written."""
    out = torch.empty((), device=partials.device, dtype=x_flat.dtype)
    return _count(partials, row, t, D, x_flat.dtype, x_flat=x_flat, out=out), out


def halve_scale(x_flat, k, out=None):
    """x halved k times (k: int32 0-dim device tensor), element by element, bit-exactly;
    ``out`` may be ``x_flat`` itself (in place)."""
    out = torch.empty_like(x_flat) if out is None else out
    n, bits = x_flat.numel(), BITS_DTYPE[x_flat.dtype]
    if n:
        with device_guard(x_flat):
            _halve_scale_kernel[(cdiv(n, 1024),)](
                x_flat.view(bits), out.view(bits), k, n, FMT=FMT[x_flat.dtype], BLOCK=1024,
                num_warps=4)
    return out


def halve_until(x_flat, t, D):
    """(y, k): the loop's result and its halving count for a contiguous 1-D tensor (t and
    D as in :func:`halve_count`): one launch for 1..ONE_MAX elements, else three."""
    n = x_flat.numel()
    if not 0 < n <= ONE_MAX:
        k = halve_count(x_flat, t, D)
        return halve_scale(x_flat, k), k
    y = torch.empty_like(x_flat)
    k = torch.empty((), device=x_flat.device, dtype=torch.int32)
    bits = BITS_DTYPE[x_flat.dtype]
    with device_guard(x_flat):
        _halve_one_kernel[(1,)](
            x_flat.view(bits), y.view(bits), k, n, float(t), f32_bits(t), D,
            FMT=FMT[x_flat.dtype], BLOCK=max(16, next_pow2(n)),
            num_warps=4 if n <= 1024 else 8)
    return y, k
