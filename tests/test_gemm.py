"""The shared fused GEMM kernel (kernels/gemm.py, kernels/gemm_tma.py) on its own: both
kernels, every operand layout, every prologue/epilogue flag, against float64."""
import pytest
import torch

from _util import assert_close_to_ref, randn
from conftest import HAS_TRITON, KERNEL_DEVICE

if HAS_TRITON:
    from fastlayers.kernels.gemm import (INTERPRETER_CONFIG, fused_gemm, heuristic_config,
                                         split_k_count)
    from fastlayers.kernels.gemm_tma import eligible

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed here")

BLOCK = 32  # the interpreter's tile; on a GPU these shapes still straddle tile edges


def operand(rows, cols, transposed, dtype, scale=1.0):
    """A [rows, cols] operand, stored row-major or as the transpose of a [cols, rows] one."""
    if transposed:
        return randn(cols, rows, dtype=dtype, device=KERNEL_DEVICE, scale=scale).t()
    return randn(rows, cols, dtype=dtype, device=KERNEL_DEVICE, scale=scale)


def ref_gemm(a, b, gate=None, bias=None, scalar=None, relu=False):
    a64 = a.double()
    if gate is not None:
        a64 = torch.where(gate.double() <= 0, 0.0, a64)
    c = a64 @ b.double()
    if bias is not None:
        c = c + bias.double()
    if scalar is not None:
        c = c + scalar
    return (torch.relu(c) if relu else c), a64.sum(1)


@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("shape", [(BLOCK + 8, BLOCK + 16, BLOCK + 8), (BLOCK, 2 * BLOCK, BLOCK),
                                   (8, 16, 8)])
def test_all_flags_and_layouts(path, dtype, a_t, b_t, shape):
    M, K, N = shape
    a = operand(M, K, a_t, dtype)
    b = operand(K, N, b_t, dtype, scale=K ** -0.5)
    gate = operand(M, K, a_t, dtype)
    bias = randn(N, dtype=dtype, device=KERNEL_DEVICE)
    # every case here is TMA-eligible (test_tma_eligibility covers the ones that are not)
    assert path != "tma" or eligible(a, b, gate), (a.stride(), b.stride())
    c, rs = fused_gemm(a, b, gate=gate, bias=bias, scalar=0.75, relu=True, rowsum=True, path=path)
    ref_c, ref_rs = ref_gemm(a, b, gate, bias, 0.75, relu=True)
    assert c.shape == (M, N) and c.dtype == dtype and c.is_contiguous()
    assert_close_to_ref(c, ref_c, dtype, what="C")
    assert_close_to_ref(rs, ref_rs, dtype, what="rowsum")


@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_plain_gemm_without_flags(path):
    a = operand(BLOCK + 3, BLOCK * 3 + 7, False, torch.float32)
    b = operand(BLOCK * 3 + 7, 2 * BLOCK + 5, False, torch.float32)
    if path == "tma" and not eligible(a, b, None):
        # 71 fp32 columns are 284-byte rows: not 16-byte aligned, so TMA refuses them
        with pytest.raises(ValueError, match="16-byte aligned"):
            fused_gemm(a, b, path=path)
        return
    assert_close_to_ref(fused_gemm(a, b, path=path), a.double() @ b.double())


def test_tma_eligibility():
    f32 = torch.float32
    assert eligible(operand(8, 16, False, f32), operand(16, 8, False, f32), None)
    assert not eligible(operand(8, 15, False, f32), operand(15, 8, False, f32), None)  # 60 B rows
    bf = torch.bfloat16
    assert not eligible(operand(8, 20, False, bf), operand(20, 8, True, bf), None)    # 40 B rows
    a = operand(8, 16, False, f32)
    assert not eligible(a, operand(16, 8, False, f32), operand(8, 16, True, f32))  # gate layout
    assert not eligible(a, operand(16, 8, False, f32).expand(16, 8)[:, :1].expand(16, 8), None)


@pytest.mark.parametrize("M, K, N", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_degenerate_shapes_launch_nothing_and_are_right(M, K, N):
    a = operand(M, K, False, torch.float32)
    b = operand(K, N, False, torch.float32)
    bias = randn(N, device=KERNEL_DEVICE)
    c, rs = fused_gemm(a, b, bias=bias, scalar=-0.5, relu=True, rowsum=True)
    ref_c, _ = ref_gemm(a, b, bias=bias, scalar=-0.5, relu=True)
    assert c.shape == (M, N) and rs.shape == (M,)
    torch.testing.assert_close(c.double().cpu(), ref_c.cpu())
    # ROWSUM sums A over K even when N == 0 (the bias gradient of a Linear with
    # in_features == 0 is such a GEMM)
    torch.testing.assert_close(rs.double().cpu(), a.double().sum(1).cpu())


def test_stride_zero_operand():
    """An expanded (stride 0) operand, as autograd hands over from .sum()."""
    a = torch.ones(1, 1, device=KERNEL_DEVICE).expand(BLOCK + 5, BLOCK + 1)
    b = operand(BLOCK + 1, 9, False, torch.float32)
    assert not eligible(a, b, None)
    assert_close_to_ref(fused_gemm(a, b), a.double() @ b.double())


# M, N, K reaching every branch of heuristic_config: the benchmark shapes, then odd sizes,
# a tall-skinny odd one and a tiny odd one (the sm_90 gate's list, tests/sm90_launches.py).
GPU_SHAPES = [(8192, 4096, 4096), (65536, 256, 256), (262144, 64, 64), (2, 8, 64),
              (8191, 4095, 4097), (4096, 70, 70), (1_000_003, 20, 20), (3, 5, 7),
              (4096, 64, 4096), (65536, 4096, 64)]


def test_heuristic_configs_fit_shared_memory():
    for M, N, K in GPU_SHAPES + [(1, 1, 1), (100, 3, 1000), (60, 60, 60)]:
        for elsize in (2, 4):
            cfg = heuristic_config(M, N, K, elsize)
            smem = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elsize
            assert smem <= 227 * 1024, (M, N, K, elsize, cfg)
            assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16
    assert INTERPRETER_CONFIG["BLOCK_M"] == BLOCK


# The GPU's tile shapes, one per branch of heuristic_config (chosen for the big shape),
# run on small shapes that leave partial tiles in M, N and K, and a K tail in every step.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_heuristic_tiles_are_correct(big, dtype):
    cfg = heuristic_config(*big, torch.empty(0, dtype=dtype).element_size())
    M, N = min(big[0], cfg["BLOCK_M"] + 3), cfg["BLOCK_N"] + 5
    K = 2 * cfg["BLOCK_K"] + 7
    a, gate = operand(M, K, False, dtype), operand(M, K, True, dtype)
    b = operand(K, N, True, dtype, scale=K ** -0.5)
    bias = randn(N, dtype=dtype, device=KERNEL_DEVICE)
    c = fused_gemm(a, b, bias=bias, scalar=0.5, relu=True, config=cfg, path="pointer")
    assert_close_to_ref(c, ref_gemm(a, b, None, bias, 0.5, relu=True)[0], dtype, what="C")
    for splits in (1, 2):  # the backward's gated GEMM, whole and split over K
        c, rs = fused_gemm(a, b, gate=gate, rowsum=True, config=cfg, split_k=splits,
                           path="pointer")
        ref_c, ref_rs = ref_gemm(a, b, gate)
        assert_close_to_ref(c, ref_c, dtype, what=f"gated C, {splits} split(s)")
        assert_close_to_ref(rs, ref_rs, dtype, what=f"rowsum, {splits} split(s)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_k_with_gate_and_rowsum(dtype, splits):
    """Split-K (the weight gradient of a tall, thin Linear): K ranges that end mid-tile,
    more splits than K steps, a transposed gated A as in the weight-gradient GEMM."""
    M, K, N = BLOCK + 3, 5 * BLOCK + 11, BLOCK - 7
    a = operand(M, K, True, dtype)
    gate = operand(M, K, True, dtype)
    b = operand(K, N, False, dtype, scale=K ** -0.5)
    c, rs = fused_gemm(a, b, gate=gate, rowsum=True, split_k=splits, path="pointer")
    ref_c, ref_rs = ref_gemm(a, b, gate)
    assert c.dtype == dtype and c.shape == (M, N) and rs.shape == (M,)
    assert_close_to_ref(c, ref_c, dtype, what="C")
    assert_close_to_ref(rs, ref_rs, dtype, what="rowsum")
    again = fused_gemm(a, b, gate=gate, rowsum=True, split_k=splits, path="pointer")
    assert torch.equal(c, again[0]) and torch.equal(rs, again[1])  # fixed-order sums


def test_split_k_refuses_an_epilogue():
    a, b = operand(8, 64, False, torch.float32), operand(64, 8, False, torch.float32)
    with pytest.raises(ValueError, match="split_k > 1 needs a GEMM without bias"):
        fused_gemm(a, b, relu=True, split_k=2)


def test_launch_plan_is_reused_per_problem_and_strides_stay_per_call():
    """The second call of a problem reuses its cached plan; the plan holds no strides, so
    the same shape with other layouts and options is still right."""
    from fastlayers.kernels.gemm import launch_plan
    M, K, N = BLOCK + 5, 2 * BLOCK + 1, BLOCK - 3
    bias = randn(N, device=KERNEL_DEVICE)
    for a_t, b_t in [(False, False), (True, True), (False, True)]:
        a, b = operand(M, K, a_t, torch.float32), operand(K, N, b_t, torch.float32)
        before = launch_plan.cache_info()
        c = fused_gemm(a, b, bias=bias, relu=True)
        after = launch_plan.cache_info()
        assert after.hits + after.misses == before.hits + before.misses + 1
        assert_close_to_ref(c, ref_gemm(a, b, bias=bias, relu=True)[0], torch.float32)
    assert after.hits > before.hits  # the layouts after the first share its plan
    plain = fused_gemm(a, b)  # the same shape without the epilogue: its own plan
    assert_close_to_ref(plain, ref_gemm(a, b)[0], torch.float32)


def test_host_cdiv_and_next_pow2_are_tritons():
    """The launchers' plain-Python cdiv / next_pow2 give triton's own values."""
    import triton
    from fastlayers.kernels.runtime import cdiv, next_pow2
    for n in list(range(0, 300)) + [2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_heuristic_config_is_cached_but_returns_a_fresh_dict():
    a = heuristic_config(8192, 4096, 4096, 2)
    a["BLOCK_M"] = 1
    assert heuristic_config(8192, 4096, 4096, 2)["BLOCK_M"] == 128


def test_heuristic_avoids_the_tiles_ptxas_serialises():
    """The sm_90 gate's findings (triton 3.6): 128x256x64/8/3 serialises wgmma (C7515);
    a single K step of 64 with 3 stages caps the memory-bound GEMM's blocks per SM."""
    big = heuristic_config(8192, 4096, 4096, 2)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"],
            big["num_stages"]) == (128, 128, 64, 8, 4)
    thin = heuristic_config(262144, 64, 64, 2)
    assert (thin["BLOCK_M"], thin["BLOCK_N"], thin["BLOCK_K"], thin["num_stages"]) == \
        (128, 64, 16, 4)


def test_split_k_count_fills_the_gpu_only_when_tiles_are_few():
    cfg = heuristic_config(64, 64, 262144, 2)
    assert split_k_count(64, 64, 262144, cfg, 132) >= 132  # one tile: spread K over SMs
    big = heuristic_config(4096, 4096, 8192, 2)
    assert split_k_count(4096, 4096, 8192, big, 132) == 1   # 512 tiles already fill it
    assert split_k_count(64, 64, 100, cfg, 132) == 1        # too little K to split
    tile = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)  # exactly as many tiles as SMs: no split
    assert split_k_count(11 * 64, 12 * 64, 1 << 16, tile, 132) == 1
    assert split_k_count(11 * 64, 12 * 64, 1 << 16, tile, 133) == 3  # one SM more: split
