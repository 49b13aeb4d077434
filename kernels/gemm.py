"""One GEMM with a fused prologue and epilogue, shared by every matmul op in fastlayers.

    C[m, n] = epilogue( sum_k A'[m, k] * B[k, n] )
    A'      = A where GATE > 0 else 0        (optional "gate": the ReLU mask of a backward)
    epilogue(acc) = relu?(acc + bias[n] + scalar), rounded once to C's dtype
    ROWSUM[m]     = sum_k A'[m, k]           (optional; the bias gradient of a backward)

Linear+ReLU forward is (x, W^T, bias, relu); its backward is (dy gated by y, W) for the
input gradient and (dy^T gated by y^T, x, rowsum) for the weight and bias gradients; the
fixed-hidden matmul is (x, W, scalar=c, relu). Operands may have any strides (stride 0
included); offsets are 64-bit. Accumulation is fp32 for every dtype.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import gemm_tma
from .runtime import (autotuning, cdiv, device_guard, dot_precision, interpreting, next_pow2,
                      sm_count, tma_enabled, to_dtype)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Pruned per call by shared memory
# use, so the fp32 and 16-bit cases each keep the ones that fit on a Hopper SM.
# 128x256x64/8/3 is left out: ptxas serialises its wgmmas (C7515) on sm_90 (triton 3.6).
_CONFIGS = [
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 32, 4, 4),
    (128, 64, 16, 4, 4),
    (64, 64, 32, 4, 3),
    (256, 64, 64, 8, 3),
    (32, 64, 128, 4, 4),
    (16, 64, 128, 4, 3),
]
_SMEM_BYTES = 220 * 1024
# One fixed config under the interpreter (autotune cannot run there); 32 keeps test
# shapes small while still exercising partial tiles and several programs per axis.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
TMA_MIN_OUTPUTS = 1 << 16
MAX_DIM = 2**30  # rows or columns of C per launch (the kernel's tile starts are int32)


def heuristic_config(M: int, N: int, K: int, elsize: int) -> dict:
    """A good launch config for a Hopper-class GPU without autotuning (the default: no
    tuning pause on each new shape). Set FASTLAYERS_AUTOTUNE=1 to search _CONFIGS instead.
    Cached per (M, N, K, elsize): the launch plan of a shape is computed once.

    M, N, K: the GEMM's sizes; elsize: bytes per operand element (4: fp32, 2: bf16/fp16).
    Returns dict(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), a new dict.

    Chosen by compiling every branch for sm_90 with triton 3.6 (the GPU machine's) at the
    benchmark, odd, tall-skinny and tiny shapes (tests/sm90_compile.py, the CI gate): no
    ptxas C7515 (wgmma serialised) and spills under the gate's budget, for the forward and
    both (gated) gradient GEMMs. Not yet timed on a GPU.

    - 16-bit, N and K > 64 and aligned: 128x128x64, 8 warps, 4 stages (128x256x64/8/3,
      the old N >= 256 tile, serialises wgmma in the forward and weight gradient;
      256x128x64/8/3 needs 255 registers and spills).
    - memory-bound (N or K <= 64), 16-bit aligned: 128x64x16, 4 warps, 4 stages: 5 blocks
      per SM in the forward (128x64x64 serialises wgmma in the gated input gradient with
      2 or 3 stages, and 1 stage leaves no load in flight).
    - fp32 (3xTF32 or tf32: elsize cannot tell them apart): 128x128x32, 8 warps, 3 stages,
      clean in 3xTF32 (the default, fp32-accurate mode). Plain tf32 serialises wgmma here in
      the forward and input gradient; its gated input gradient does so in every tile tried
      (64..256 x 64..256 x 16..64, 4 or 8 warps, 2-4 stages), so it needs a kernel change,
      and the gate reports tf32 as KNOWN rather than failing.
    - N or K not a multiple of 16 (odd layer sizes) means unvectorised loads, one pointer
      register per element: short K steps (and 8 warps on tall shapes) keep the tiles
      nearly free of register spills.
    """
    return dict(_heuristic(M, N, K, elsize))


@functools.lru_cache(maxsize=4096)
def _heuristic(M: int, N: int, K: int, elsize: int) -> tuple:
    aligned = N % 16 == 0 and K % 16 == 0
    # A K step no longer than K needs (each thread holds a pointer per loaded element:
    # oversized tiles of small, unaligned K spill registers).
    bk = min(64 if elsize == 2 and aligned else 32, max(16, next_pow2(K)))
    if M <= 64:  # skinny: one row-tile, long K steps
        bm = max(16, next_pow2(M))
        cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=2 * bk if aligned else bk, GROUP_M=8,
                   num_warps=4, num_stages=3)
    elif N <= 64 or K <= 64:  # memory-bound: small tiles, many programs in flight per SM
        bn = max(32, min(64, next_pow2(N)))
        if elsize == 2 and aligned:
            cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=16, GROUP_M=8, num_warps=4,
                       num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8,
                       num_stages=3)
    elif not aligned:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)
    elif elsize == 2:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)
    return tuple(cfg.items())


def _prune(configs, named_args, **kwargs):
    elsize = named_args["a_ptr"].element_size()
    k = named_args["K"]
    m_bucket = named_args["M_BUCKET"]
    keep = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        smem = cfg.num_stages * (bm * bk + bk * bn) * elsize
        if smem > _SMEM_BYTES:
            continue
        if bk > max(32, next_pow2(k)) or bm > max(16, 2 * m_bucket):
            continue
        keep.append(cfg)
    return keep or configs[-1:]


@triton.jit
def _fused_gemm_kernel(
    # Pointers: operands A [M, K] and B [K, N]; the optional gate [M, K] (the ReLU mask of a
    # backward) and bias [N] (unit stride); outputs C [M, N] and ROWSUM [M] (with split-K:
    # fp32 workspaces [splits, M, N] and [splits, M]).
    a_ptr, b_ptr, gate_ptr, bias_ptr, c_ptr, rowsum_ptr,
    # Sizes. M_BUCKET: next_power_of_2(M), the autotuner's key; K_PER_SPLIT: the K range
    # one program reduces (K itself without split-K).
    M, N, K, M_BUCKET, K_PER_SPLIT,
    # Strides, in elements, of A, B, the gate and C; stride_cs / stride_rs: between split-K
    # slices of the workspaces (0 without split-K).
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_gm, stride_gk, stride_cm, stride_cn, stride_cs, stride_rs,
    # A Python float added in fp32 before the ReLU (the fixed-hidden matmul's c).
    scalar,
    # Which prologue/epilogue parts exist (compiled out when False).
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALAR: tl.constexpr,
    RELU: tl.constexpr, ROWSUM: tl.constexpr,
    # tl.dot's input_precision ("tf32", "tf32x3", "ieee"); UPCAST: load 16-bit operands as
    # fp32 (the interpreter holds them as raw integers).
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    # Tile shape and the grouped launch order (GROUP_M row-tiles share a column tile in L2).
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C = epilogue(A' @ B), A' = A gated, over this
    program's K range; see the module docstring for the formula."""
    # Grouped launch order: GROUP_M row-tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Split-K: program (pid, pid_k) reduces K range [k_lo, k_lo + K_PER_SPLIT) into slice
    # pid_k of an fp32 workspace (stride_cs / stride_rs apart); one split: k_lo = 0.
    pid_k = tl.program_id(1)
    k_lo = (pid_k * K_PER_SPLIT).to(tl.int64)
    k_len = tl.minimum(K - pid_k * K_PER_SPLIT, K_PER_SPLIT)

    # Tile starts in int32 (fused_gemm launches at most MAX_DIM rows and columns at once),
    # widened before they meet a stride.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_lo + rk[None, :]) * stride_ak
    b_ptrs = b_ptr + (k_lo + rk[:, None]) * stride_bk + rn[None, :] * stride_bn
    g_ptrs = gate_ptr + rm[:, None] * stride_gm + (k_lo + rk[None, :]) * stride_gk

    k_step = tl.full([], BLOCK_K, tl.int64)  # pointer steps: BLOCK_K * stride passes 2**31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_ok = rk < k_len - k * BLOCK_K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter holds 16-bit floats as raw integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_GATE:
            g = tl.load(g_ptrs, mask=a_mask, other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
            a = tl.where(g <= 0, tl.zeros_like(a), a)  # torch's threshold_backward
            g_ptrs += k_step * stride_gk
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ROWSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += k_step * stride_ak
        b_ptrs += k_step * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if HAS_SCALAR:
        acc += scalar
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, like torch.relu
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, to_dtype(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + pid_k.to(tl.int64) * stride_rs + rm,
                     to_dtype(rsum, rowsum_ptr.dtype.element_ty), mask=m_ok)


_KEY = ["M_BUCKET", "N", "K", "HAS_GATE", "HAS_BIAS", "RELU", "ROWSUM", "PRECISION", "UPCAST"]
_fused_gemm_autotuned = triton.autotune(
    configs=[
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _CONFIGS
    ],
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_fused_gemm_kernel)


def split_k_count(M: int, N: int, K: int, cfg: dict, sms: int) -> int:
    """K splits that fill the GPU when the output has fewer tiles than SMs (the weight
    gradient of a tall, thin Linear: a 64x64 output reduced over 262144 rows would
    otherwise run on one SM). At least 4 K steps per split; 1 when the tiles suffice."""
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, tiles), K // (4 * cfg["BLOCK_K"]), 1024))


class LaunchPlan(NamedTuple):
    """What a launch needs besides the tensors: computed once per problem (:func:`launch_plan`)."""
    kernel: object  # _fused_gemm_kernel, or its autotuned wrapper
    flags: dict  # the constexpr switches: HAS_GATE, HAS_BIAS, HAS_SCALAR, RELU, ROWSUM, ...
    cfg: dict  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages ({}: autotuned)
    meta: dict  # flags and cfg in one dict: the pointer kernel's keyword arguments
    grid: object  # (programs, splits), or a function of the autotuner's chosen config
    split_k: int
    k_per_split: int  # the K range one program reduces
    m_bucket: int  # next_power_of_2(M): the autotuner's key


@functools.lru_cache(maxsize=4096)
def launch_plan(M: int, N: int, K: int, dtype: torch.dtype, has_gate=False, has_bias=False,
                has_scalar=False, relu=False, rowsum=False, fp32_mode="ieee", config=None,
                split_k=None, sms=1, autotune=False) -> LaunchPlan:
    """The launch plan of one problem, cached: a repeated call of the same shape and options
    spends no Python on flags, configs, split-K or the grid.

    M, N, K, dtype: the GEMM; has_*/relu/rowsum/fp32_mode/split_k: :func:`fused_gemm`'s
    options; config: its config as a tuple of items (None: the shape heuristic); sms: the
    device's SM count (split-K sizing); autotune: search ``_CONFIGS`` (no fixed config).
    """
    flags = dict(HAS_GATE=has_gate, HAS_BIAS=has_bias, HAS_SCALAR=has_scalar, RELU=relu,
                 ROWSUM=rowsum, PRECISION=dot_precision(dtype, fp32_mode),
                 UPCAST=interpreting() and dtype != torch.float32)
    if autotune:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)
        return LaunchPlan(_fused_gemm_autotuned, flags, {}, flags, grid, 1, K,
                          next_pow2(M))
    cfg = dict(config) if config else (INTERPRETER_CONFIG if interpreting() else
                                       heuristic_config(M, N, K, dtype.itemsize))
    epilogue = has_bias or has_scalar or relu
    if split_k is None:
        split_k = 1 if interpreting() or epilogue else split_k_count(M, N, K, cfg, sms)
    if split_k > 1 and epilogue:
        raise ValueError("fused_gemm: split_k > 1 needs a GEMM without bias, scalar "
                         "or relu (the epilogue runs once, on the whole sum)")
    k_per_split = K
    if split_k > 1:
        step = cfg["BLOCK_K"]
        k_per_split = cdiv(cdiv(K, split_k), step) * step
        split_k = cdiv(K, k_per_split)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split_k)
    return LaunchPlan(_fused_gemm_kernel, flags, cfg, {**flags, **cfg}, grid, split_k,
                      k_per_split, next_pow2(M))


def fused_gemm(a, b, *, gate=None, bias=None, scalar=None, relu=False, rowsum=False,
               fp32_mode="ieee", path="auto", config=None, split_k=None):
    """Launch the fused GEMM.

    a: [M, K] and b: [K, N], same float dtype (fp32, fp16 or bf16), same device, any strides.
    gate: optional [M, K]; A is zeroed where gate <= 0 (NaN gates pass, as in torch).
    bias: optional [N] of a's dtype (any stride: made contiguous first), added in fp32. scalar: optional Python float added in fp32.
    relu: clamp negatives to 0 after the adds (NaN stays NaN, like torch.relu).
    rowsum: also return sum_k A'[m, k] (fp32 accumulation, rounded to a's dtype).
    fp32_mode: "ieee" (fp32-accurate, 3xTF32) or "tf32", used only for fp32 operands.
    path: "auto" (the pointer kernel; with FASTLAYERS_TMA=1 the persistent TMA kernel on a
    GPU when the operands allow it), "tma" or "pointer" (forced; for tests and A/B runs).
    config: optional launch config dict (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages) replacing the shape heuristic (for sweeps; in the interpreter, for tests of
    the GPU's tile shapes).
    split_k: K splits of the pointer kernel (default: :func:`split_k_count` on a GPU, 1 in
    the interpreter); splits > 1 reduce into an fp32 workspace summed in a fixed order
    (deterministic), so they need an epilogue-free GEMM (no bias, scalar or relu).
    Returns C [M, N] contiguous in a's dtype, or (C, rowsum [M]) when rowsum is True.
    """
    M, K = a.shape
    N = b.shape[1]
    if bias is not None:  # the kernel reads bias[n] at unit stride; a strided [N] copy is cheap
        bias = bias.contiguous()
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    rs = torch.empty((M,), device=a.device, dtype=a.dtype) if rowsum else None
    if M == 0 or N == 0 or K == 0:
        _degenerate(a, gate, c, rs, bias, scalar, relu)
        return (c, rs) if rowsum else c
    if M > MAX_DIM or N > MAX_DIM:
        _in_slices(a, b, gate, bias, c, rs, scalar=scalar, relu=relu, fp32_mode=fp32_mode,
                   path=path, config=config, split_k=split_k)
        return (c, rs) if rowsum else c
    if path == "tma" and not gemm_tma.eligible(a, b, gate):
        raise ValueError("fused_gemm: path='tma' needs 16-byte aligned operands with a "
                         "unit-stride dim (see kernels.gemm_tma.eligible)")
    # The TMA kernel is opt-in (FASTLAYERS_TMA=1) until a GPU check has measured it against
    # the pointer kernel; descriptors cost host time, so tiny problems never take it.
    use_tma = path == "tma" or (path == "auto" and tma_enabled() and not interpreting()
                                and not autotuning() and a.is_cuda and M * N >= TMA_MIN_OUTPUTS
                                and gemm_tma.eligible(a, b, gate))
    plan = launch_plan(M, N, K, a.dtype, gate is not None, bias is not None, scalar is not None,
                       relu, rowsum, fp32_mode, None if config is None else tuple(config.items()),
                       1 if use_tma else split_k, sm_count(a.device.index or 0),
                       autotuning() and not interpreting() and not use_tma)
    with device_guard(a):
        if use_tma:
            cfg = plan.cfg
            per_sm = 2 if cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 64 else 1
            sms = sm_count(a.device.index or 0) if a.is_cuda else 4
            gemm_tma.launch(a, b, gate, bias, c, rs, scalar, plan.flags, cfg, per_sm * sms)
        else:
            _launch_pointer(plan, a, b, gate, bias, scalar, c, rs)
    return (c, rs) if rowsum else c


def _in_slices(a, b, gate, bias, c, rs, **options):
    """:func:`fused_gemm` into c (and rs) one [MAX_DIM, MAX_DIM] block of C at a time (views
    of the operands, no copies): C's rows and columns are independent, and the kernel's
    int32 tile starts stay below 2**31."""
    M, N = c.shape
    for i in range(0, M, MAX_DIM):
        rows = slice(i, i + MAX_DIM)
        for j in range(0, N, MAX_DIM):
            cols = slice(j, j + MAX_DIM)
            part = fused_gemm(a[rows], b[:, cols], gate=None if gate is None else gate[rows],
                              bias=None if bias is None else bias[cols],
                              rowsum=rs is not None and j == 0, **options)
            if rs is not None and j == 0:
                part, rs[rows] = part
            c[rows, cols] = part


def _launch_pointer(plan, a, b, gate, bias, scalar, c, rs):
    """Launch the pointer kernel by ``plan``; K splits go to fp32 workspaces summed over
    the split axis."""
    M, K = a.shape
    N = b.shape[1]
    c_out, rs_out = c, rs
    split_k = plan.split_k
    if split_k > 1:
        c_out = torch.empty((split_k, M, N), device=a.device, dtype=torch.float32)
        rs_out = torch.empty((split_k, M), device=a.device, dtype=torch.float32) \
            if rs is not None else None
    gate_t = gate if gate is not None else a
    dummy = c_out
    (sam, sak), (sbk, sbn), (sgm, sgk) = a.stride(), b.stride(), gate_t.stride()
    plan.kernel[plan.grid](
        a, b, gate_t, bias if bias is not None else dummy, c_out,
        rs_out if rs_out is not None else dummy,
        M, N, K, plan.m_bucket, plan.k_per_split,
        sam, sak, sbk, sbn, sgm, sgk, c_out.stride(-2), c_out.stride(-1),
        M * N if split_k > 1 else 0, M if split_k > 1 else 0,
        0.0 if scalar is None else float(scalar), **plan.meta)
    if split_k > 1:
        c.copy_(c_out.sum(0))
        if rs is not None:
            rs.copy_(rs_out.sum(0))


def _degenerate(a, gate, c, rs, bias, scalar, relu):
    """Fill outputs of an empty GEMM (M, N or K is 0) without launching a kernel: C is the
    epilogue of a zero sum; ROWSUM still sums A' over K (N = 0 does not empty it)."""
    acc = torch.zeros(c.shape, device=c.device, dtype=torch.float32)
    if bias is not None:
        acc += bias.float()
    if scalar is not None:
        acc += scalar
    if relu:
        acc = torch.where(acc < 0, 0.0, acc)
    c.copy_(acc)
    if rs is not None:
        a32 = a.float()
        if gate is not None:
            a32 = torch.where(gate <= 0, 0.0, a32)
        rs.copy_(a32.sum(1))
