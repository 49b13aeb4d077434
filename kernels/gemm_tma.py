"""The fused GEMM of gemm.py as a persistent kernel fed by TMA (Hopper's bulk tensor copy).

Same contract as :func:`kernels.gemm.fused_gemm` (gate prologue, bias/scalar/ReLU epilogue,
row sums). One program per SM walks the output tiles (grouped order for L2 reuse); the
tile loop is flattened with the K loop so the next tile's loads are in flight while the
current tile finishes: what a memory-bound shape (K, N <= 64) needs to approach copy
bandwidth. Gated GEMMs (the backward's) keep the loops nested (FLATTEN=False): flattened,
ptxas serialises their wgmmas on sm_90 (C7515, triton 3.6, every tile tried; the sm_90
gate, tests/sm90_compile.py, checks this). Operands are read through host-side tensor descriptors, which need a 16-byte
aligned base, one unit-stride dim and 16-byte aligned other strides (:func:`eligible`);
out-of-bounds boxes read as zeros, so no load masks are needed. The output is stored with
masked pointer stores (any strides).
"""
import torch
import triton
import triton.language as tl

from .runtime import cdiv, to_dtype

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side descriptors: only the pointer kernel
    TensorDescriptor = None


_MAX_DIM = 2**31 - 2**10  # so that tile offsets (i32) never pass 2**31


def _aligned(t: torch.Tensor) -> bool:
    """t is 2-D, one stride is 1, the other a multiple of 16 bytes, base 16-byte aligned."""
    if t.dim() != 2 or t.data_ptr() % 16:
        return False
    s0, s1 = t.stride()
    e = t.element_size()
    return (s1 == 1 and s0 * e % 16 == 0 and s0 > 0) or (s0 == 1 and s1 * e % 16 == 0 and s1 > 0)


def eligible(a, b, gate) -> bool:
    """Whether the TMA kernel can read these operands (else use the pointer kernel)."""
    if TensorDescriptor is None:
        return False
    if not (_aligned(a) and _aligned(b) and (gate is None or _aligned(gate))):
        return False
    if gate is not None and (gate.stride(1) == 1) != (a.stride(1) == 1):
        return False
    # descriptor loads take 32-bit tile offsets
    return min(a.shape) > 0 and b.shape[1] > 0 and max(*a.shape, *b.shape) <= _MAX_DIM


def descriptor(t, k_major_dim: int, block_rows: int, block_k: int):
    """A descriptor over t's memory with its unit-stride dim last.

    t: [R, K] (k_major_dim=1) or [K, R] (k_major_dim=0) in logical terms; the box is
    [block_rows, block_k] when K is the unit-stride dim, else [block_k, block_rows].
    Returns (descriptor, k_contiguous).
    """
    rows_dim = 1 - k_major_dim
    if t.stride(k_major_dim) == 1:
        shape = [t.shape[rows_dim], t.shape[k_major_dim]]
        strides = [t.stride(rows_dim), 1]
        return TensorDescriptor(t, shape, strides, [block_rows, block_k]), True
    shape = [t.shape[k_major_dim], t.shape[rows_dim]]
    strides = [t.stride(k_major_dim), 1]
    return TensorDescriptor(t, shape, strides, [block_k, block_rows]), False


@triton.jit
def _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_a(desc, off_m, off_k, K_CONTIG: tl.constexpr):
    """The [BM, BK] tile of an A-shaped operand at (off_m, off_k)."""
    # if/else, not an early return: the compiler type-checks the statements after a
    # constexpr-true `if` too, and this one's [BK, BM] box gives the wrong shape there.
    if K_CONTIG:
        return desc.load([off_m, off_k])
    else:
        return desc.load([off_k, off_m]).T


@triton.jit
def _fused_gemm_tma_kernel(
    a_desc, b_desc, g_desc, bias_ptr, c_ptr, rowsum_ptr,
    M, N, K, stride_cm, stride_cn, scalar,
    A_K_CONTIG: tl.constexpr, B_K_CONTIG: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALAR: tl.constexpr,
    RELU: tl.constexpr, ROWSUM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_id_c = start - NUM_PROGRAMS  # separate epilogue counter (pipeliner requirement)

    for tile_id in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = _load_a(a_desc, off_m, off_k, A_K_CONTIG)
            if B_K_CONTIG:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            if UPCAST:  # the interpreter holds 16-bit floats as raw integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if HAS_GATE:
                g = _load_a(g_desc, off_m, off_k, A_K_CONTIG)
                if UPCAST:
                    g = g.to(tl.float32)
                a = tl.where(g <= 0, tl.zeros_like(a), a)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if ROWSUM:
                rsum += tl.sum(a.to(tl.float32), axis=1)

        tile_id_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALAR:
            acc += scalar
        if RELU:
            acc = tl.where(acc < 0, 0.0, acc)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, to_dtype(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        if ROWSUM:  # only pid_n == 0 stores: a mask, as an `if` in this flattened loop
            # breaks triton 3.6's TritonGPUFuseNestedLoops pass (and `m_ok & (pid_n == 0)`
            # gives a mask the 3.9 interpreter rejects)
            tl.store(rowsum_ptr + rm, to_dtype(rsum, rowsum_ptr.dtype.element_ty),
                     mask=rm < tl.where(pid_n == 0, M, 0))


def launch(a, b, gate, bias, c, rs, scalar, flags, cfg, num_programs):
    """Build the descriptors for ``cfg``'s block shapes and launch on ``num_programs``."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc, a_k = descriptor(a, 1, bm, bk)
    b_desc, b_k = descriptor(b, 0, bn, bk)
    g_desc = descriptor(gate, 1, bm, bk)[0] if gate is not None else a_desc
    M, K = a.shape
    N = b.shape[1]
    tiles = cdiv(M, bm) * cdiv(N, bn)
    programs = max(1, min(num_programs, tiles))
    _fused_gemm_tma_kernel[(programs,)](
        a_desc, b_desc, g_desc, bias if bias is not None else c, c, rs if rs is not None else c,
        M, N, K, c.stride(0), c.stride(1), 0.0 if scalar is None else float(scalar),
        A_K_CONTIG=a_k, B_K_CONTIG=b_k, **flags, **cfg, NUM_PROGRAMS=programs,
        FLATTEN=gate is None,
    )
