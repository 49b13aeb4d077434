"""The seed's FixedHiddenMLP forward: y = L(relu(L(x) @ R + c)) with ONE Linear L(v) =
v @ W.T + b used twice, then the halving loop (``kernels.halve_until``), sync-free.

Small d (<= FUSED_MAX_D, e.g. the seed's 20): W, b and R fit in one program's registers, so
one kernel computes, per block of rows, all three matmuls. When one program covers the
batch (M <= BLOCK_M: the seed's B=2) it also counts the halvings in registers and writes
the halved y (or its sum) and k: ONE launch. Otherwise each program writes y plus a row
of partial sums (sum |y|, sum |y| * 2**-64, sum y); then the one-program count kernel
derives k (and, for ``reduce='sum'``, the result: (sum y) * 2**-k, or the halved y re-read
and added when an element rounds or |y|'s sum overflowed), and the scale kernel halves y
in place: 3 launches (2 for ``reduce='sum'``, which never halves y in memory). fp16 rows
also hold every S_j (see kernels.halve_until); its ``reduce='sum'`` halves y, then sums it
with torch (the seed's ``X.sum()``).
Larger d composes three fused GEMMs and the halving kernels.

Numerics: fp32 accumulation; every intermediate (L(x), the fixed-hidden output, y) is
rounded to x's dtype, as the seed's separate torch ops round them.
"""
import torch
import triton
import triton.language as tl

from . import halve_until as halve
from .gemm import fused_gemm
from .halve_until import _halve_bits, _round_to, _to_f32, _total, _write_partials, count_in_block
from .runtime import cdiv, device_guard, dot_precision, interpreting, next_pow2

FUSED_MAX_D = 64
# Partials row: [sum |y|, sum |y| * 2**-64, sum y, exact halvings] (+ every S_j for fp16)
PART_ROW = {torch.float32: halve.SUM_COLS.value, torch.bfloat16: halve.SUM_COLS.value,
            torch.float16: halve.NPART.value}


@triton.jit
def _bits_of(v, FMT: tl.constexpr):
    """Bit pattern (int32; 16-bit formats in the low half) of an fp32 v already rounded to
    the format."""
    if FMT == 0:
        return v.to(tl.int32, bitcast=True)
    elif FMT == 1:
        return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        return (v.to(tl.int32, bitcast=True) >> 16) & 0xFFFF


@triton.jit
def _operand(v, dtype, UPCAST: tl.constexpr):
    """A rounded fp32 value as a tl.dot operand: the input dtype on a GPU (exact)."""
    if UPCAST:
        return v
    else:
        return v.to(dtype)


@triton.jit
def _fixed_hidden_mlp_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, h2_ptr, part_ptr, k_ptr,
    M, D, stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_rk, stride_rn, c,
    t, t_bits, window,
    HAS_BIAS: tl.constexpr, FMT: tl.constexpr, WRITE_Y: tl.constexpr,
    SAVE_H2: tl.constexpr, PARTIALS: tl.constexpr, ROW: tl.constexpr, ONE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, DP: tl.constexpr,
):
    """y = L(relu(L(x) @ R + c)) for a block of BLOCK_M rows (the module docstring). ONE:
    this program holds the whole batch, so it also counts the halvings (t, t_bits, window:
    the threshold in x's dtype, its fp32 bits, the rule's window D) and writes k and the
    halved y (or, without WRITE_Y, the sum of the halved y into y_ptr[0])."""
    pid = tl.program_id(0)
    rm = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: M may pass 2**31
    rd = tl.arange(0, DP).to(tl.int64)  # and (d - 1) * a stride too
    m_ok = rm < M
    d_ok = rd < D
    dd_ok = d_ok[:, None] & d_ok[None, :]
    md_ok = m_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rd[None, :] * stride_xk, mask=md_ok, other=0.0)
    # wt[k, n] = W[n, k]: L(v) = v @ wt + b
    wt = tl.load(w_ptr + rd[:, None] * stride_wk + rd[None, :] * stride_wn, mask=dd_ok, other=0.0)
    r = tl.load(r_ptr + rd[:, None] * stride_rk + rd[None, :] * stride_rn, mask=dd_ok, other=0.0)
    if UPCAST:  # the interpreter holds 16-bit floats as raw integers
        x = x.to(tl.float32)
        wt = wt.to(tl.float32)
        r = r.to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    bias = tl.zeros([DP], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rd * stride_b, mask=d_ok, other=0.0).to(tl.float32)

    # Padded columns are zeroed after each stage: an inf times a padded 0 would be NaN.
    h1 = _round_to(tl.dot(x, wt, input_precision=PRECISION) + bias[None, :], FMT)
    h1 = tl.where(d_ok[None, :], h1, 0.0)
    z = _round_to(tl.dot(_operand(h1, dtype, UPCAST), r, input_precision=PRECISION) + c, FMT)
    h2 = tl.where(d_ok[None, :], tl.where(z < 0, 0.0, z), 0.0)  # keeps NaN, like torch.relu
    y = _round_to(tl.dot(_operand(h2, dtype, UPCAST), wt, input_precision=PRECISION)
                  + bias[None, :], FMT)

    offs = rm[:, None] * D + rd[None, :]
    if SAVE_H2:
        tl.store(h2_ptr + offs, _bits_of(h2, FMT).to(h2_ptr.dtype.element_ty), mask=md_ok)
    if ONE:
        u = _bits_of(y, FMT)
        k = count_in_block(u, md_ok, t, t_bits, window, FMT)
        tl.store(k_ptr, k)
        u = _halve_bits(u, k, FMT)
        if WRITE_Y:
            tl.store(y_ptr + offs, u.to(y_ptr.dtype.element_ty), mask=md_ok)
        else:
            s = _round_to(_total(tl.where(md_ok, _to_f32(u, FMT), 0.0)), FMT)
            tl.store(y_ptr, _bits_of(s, FMT).to(y_ptr.dtype.element_ty))
    elif WRITE_Y:
        tl.store(y_ptr + offs, _bits_of(y, FMT).to(y_ptr.dtype.element_ty), mask=md_ok)
    if PARTIALS:
        _write_partials(part_ptr + pid.to(tl.int64) * ROW, _bits_of(y, FMT), md_ok, FMT,
                        FMT != 1, FMT == 1)


def _fused_config(d):
    dp = max(16, next_pow2(d))
    if interpreting():
        return dp, 16, 4
    return dp, (64 if dp <= 32 else 32), 4


def fixed_hidden_mlp_fwd(x, weight, bias, rand_weight, c, t, window, reduce_sum, save_h2,
                         fp32_mode="ieee", path="auto"):
    """(out, k, h2) for x [M, d], weight [d, d] (nn.Linear layout), bias [d] (any stride,
    0 too) or None, rand_weight [d, d]; same device and dtype (fp32, fp16 or bf16).

    out: y halved k times [M, d], or its sum (0-dim) when reduce_sum. k: int32 0-dim (see
    kernels.halve_until). h2: relu(L(x) @ R + c) [M, d] when save_h2 (the backward needs
    it), else an empty tensor. t: the threshold in x's dtype; window: the count rule's D
    for M * d elements. path: "auto" (fused for d <= FUSED_MAX_D), "fused" or "composed"
    (forced, for tests). Launches: 1 when one program covers the batch, else 3 (2 for
    reduce_sum in fp32/bf16; fp16's reduce_sum adds torch's sum of the halved y).
    """
    M, d = x.shape
    fused = path == "fused" or (path == "auto" and d <= FUSED_MAX_D)
    if fused and d > FUSED_MAX_D:
        raise ValueError(f"fixed_hidden_mlp_fwd: the fused kernel holds d <= {FUSED_MAX_D}, "
                         f"got {d}")
    if not fused:
        return _composed(x, weight, bias, rand_weight, c, t, window, reduce_sum, save_h2,
                         fp32_mode)
    dp, block_m, warps = _fused_config(d)
    P = cdiv(M, block_m)
    one, fp16 = P == 1, x.dtype == torch.float16
    write_y = not (reduce_sum and one)  # the count kernel may re-read y (count_and_sum)
    bits = halve.BITS_DTYPE[x.dtype]
    y = torch.empty((M, d) if write_y else (), device=x.device, dtype=x.dtype)
    h2 = torch.empty((M, d) if save_h2 else (0,), device=x.device, dtype=x.dtype)
    if one:  # this launch writes k; no partials (part: an unused pointer argument)
        k = part = torch.empty((), device=x.device, dtype=torch.int32)
    else:  # partials for the count kernel, which makes k (k: an unused pointer argument)
        k = part = torch.empty((P, PART_ROW[x.dtype]), device=x.device, dtype=torch.float32)
    if P:
        with device_guard(x):
            _fixed_hidden_mlp_fwd_kernel[(P,)](
                x, weight, bias if bias is not None else weight, rand_weight,
                y.view(bits), h2.view(bits), part, k,
                M, d, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                bias.stride(0) if bias is not None else 0, rand_weight.stride(0),
                rand_weight.stride(1), float(c), float(t), halve.f32_bits(t), window,
                HAS_BIAS=bias is not None, FMT=halve.FMT[x.dtype], WRITE_Y=write_y,
                SAVE_H2=save_h2, PARTIALS=not one, ROW=PART_ROW[x.dtype], ONE=one,
                PRECISION=dot_precision(x.dtype, fp32_mode),
                UPCAST=interpreting() and x.dtype != torch.float32, BLOCK_M=block_m, DP=dp,
                num_warps=warps)
    if one:
        return y, k, h2
    return (*_halve(y, t, window, reduce_sum, part, PART_ROW[x.dtype]), h2)


def _halve(y, t, window, reduce_sum, part=None, row=halve.NPART.value):
    """(out, k) by the halving kernels from y's partials rows (``row`` floats each), which
    the fused kernel wrote or, when ``part`` is None, a pass over the written y makes.
    reduce_sum: fp32/bf16 take (sum y) * 2**-k from the rows (y is re-read only when an
    element rounds or |y|'s sum overflowed; never halved in memory); fp16 halves y and sums
    it with torch (the seed's ``X.sum()``)."""
    if reduce_sum and y.dtype != torch.float16:
        if part is None:
            part = halve.halve_partials(y.view(-1), signed=True)
        k, out = halve.count_and_sum(part, y.view(-1), t, window, row=row)
        return out, k
    flat = y.view(-1)
    k = halve.halve_count(flat, t, window, partials=part, row=row)
    halve.halve_scale(flat, k, out=flat)
    return (y.sum() if reduce_sum else y), k


def _composed(x, weight, bias, rand_weight, c, t, window, reduce_sum, save_h2, fp32_mode):
    bias = None if bias is None else bias.contiguous()  # fused_gemm reads bias contiguous
    h1 = fused_gemm(x, weight.t(), bias=bias, fp32_mode=fp32_mode)
    h2 = fused_gemm(h1, rand_weight, scalar=c, relu=True, fp32_mode=fp32_mode)
    y = fused_gemm(h2, weight.t(), bias=bias, fp32_mode=fp32_mode)
    out, k = _halve(y, t, window, reduce_sum)
    return out, k, (h2 if save_h2 else h2.new_empty((0,)))


def fixed_hidden_mlp_bwd(grad_y, x, weight, rand_weight, h2, fp32_mode="ieee"):
    """(grad_x, grad_weight, grad_bias) given dL/dy [M, d] (any strides, stride 0 too).

    The chain through the batch (dL/dh2, the gated dL/dh1, dL/dx) runs on the fused GEMM,
    the ReLU mask applied as its gate; the [d, d] weight gradient and the bias gradient
    reduce over the batch, where torch's split-K matmul beats one program per tile.
    """
    g_h2 = fused_gemm(grad_y, weight, fp32_mode=fp32_mode)
    g_h1 = fused_gemm(g_h2, rand_weight.t(), gate=h2, fp32_mode=fp32_mode)
    grad_x = fused_gemm(g_h1, weight, fp32_mode=fp32_mode)
    grad_w = torch.addmm(g_h1.t() @ x, grad_y.t(), h2)
    grad_b = grad_y.sum(0) + g_h1.sum(0)
    return grad_x, grad_w, grad_b
