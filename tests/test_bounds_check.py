"""The bounds-checked interpreter (tests/_bounds.py) catches out-of-bounds kernel accesses:
planted bugs in tiny kernels and in a copy of the GEMM kernel without its N mask fail,
naming the kernel, the argument and the offset; correct kernels pass."""
import importlib.util
import inspect

import _bounds
import pytest
import torch
from conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not (HAS_TRITON and _bounds.installed()),
                                reason="bounds check is on only under the Triton interpreter "
                                       "(and FASTLAYERS_BOUNDS_CHECK != 0)")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, stride, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        # Copies n elements src[i * stride]; EXTRA widens the mask past n (the planted bug).
        i = tl.arange(0, BLOCK)
        x = tl.load(src_ptr + i * stride, mask=i < n + EXTRA)
        tl.store(dst_ptr + i, x, mask=i < n)

    @triton.jit
    def _store_kernel(dst_ptr, n, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst_ptr + i, i.to(tl.float32), mask=i < n + EXTRA)


def _expect_violation(fn, *needles):
    """Run ``fn``; it must raise and record a violation whose message holds each needle."""
    with pytest.raises(Exception) as info:
        fn()
    found = _bounds.take_violations()
    assert len(found) == 1, found
    for needle in needles:
        assert needle in found[0], f"{needle!r} not in: {found[0]}"
        assert needle in str(info.value), f"{needle!r} not in the raised error: {info.value}"
    return found[0]


def test_masked_copy_passes():
    src = torch.randn(13)
    dst = torch.empty(13)
    _copy_kernel[(1,)](src, dst, 13, 1, EXTRA=0, BLOCK=16)
    assert torch.equal(dst, src)
    assert _bounds.take_violations() == []


def test_read_past_the_end_fails():
    src, dst = torch.randn(13), torch.empty(13)
    msg = _expect_violation(lambda: _copy_kernel[(1,)](src, dst, 13, 1, EXTRA=1, BLOCK=16),
                            "_copy_kernel", "src_ptr + 13 elements", "load")
    assert "1 of 14 active" in msg


def test_store_past_the_end_fails():
    dst = torch.empty(7)
    _expect_violation(lambda: _store_kernel[(1,)](dst, 7, EXTRA=2, BLOCK=16),
                      "_store_kernel", "store", "dst_ptr + 7 elements")


def test_read_inside_storage_but_outside_the_view_fails():
    # Offset view: the kernel is handed base[3:10]; reading element 7 of it is base[10],
    # inside the storage but not an element of the view.
    base = torch.randn(20)
    src, dst = base[3:10], torch.empty(7)
    _expect_violation(lambda: _copy_kernel[(1,)](src, dst, 7, 1, EXTRA=1, BLOCK=8),
                      "src_ptr + 7 elements", "storage offset 3")
    # A strided view: its gaps are not its elements either.
    strided = base[::2]
    _expect_violation(lambda: _copy_kernel[(1,)](strided, torch.empty(10), 10, 1, EXTRA=0,
                                                 BLOCK=16),
                      "src_ptr + 1 elements", "strides (2,)")
    # ... while walking it with its stride is fine.
    out = torch.empty(10)
    _copy_kernel[(1,)](strided, out, 10, 2, EXTRA=0, BLOCK=16)
    assert torch.equal(out, strided)


def _gemm_without_n_mask(tmp_path):
    """A copy of kernels/gemm.py's kernel whose B load lacks its N mask (the bug of issue 16)."""
    from fastlayers.kernels import gemm
    src = inspect.getsource(gemm._fused_gemm_kernel.fn)
    good = "mask=k_ok[:, None] & n_ok[None, :]"
    assert src.count(good) == 1, "the GEMM kernel's B load changed: update this test"
    path = tmp_path / "gemm_no_n_mask.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n"
                    + src.replace(good, "mask=k_ok[:, None]"))
    spec = importlib.util.spec_from_file_location("gemm_no_n_mask", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return gemm, mod._fused_gemm_kernel


def _launch(gemm, kernel, a, b):
    M, N = a.shape[0], b.shape[1]
    c = torch.empty(M, N)
    plan = gemm.launch_plan(M, N, a.shape[1], a.dtype, relu=True)._replace(kernel=kernel)
    gemm._launch_pointer(plan, a, b, None, None, None, c, None)
    return c


def test_gemm_b_load_without_n_mask_fails(tmp_path):
    gemm, planted = _gemm_without_n_mask(tmp_path)
    a, weight = torch.randn(5, 7), torch.randn(3, 7)  # b = weight.t(): columns are 7 apart
    b = weight.t()
    # The real kernel passes the check and is right.
    torch.testing.assert_close(_launch(gemm, gemm._fused_gemm_kernel, a, b),
                               torch.relu(a.double() @ b.double()).float())
    assert _bounds.take_violations() == []
    _expect_violation(lambda: _launch(gemm, planted, a, b), "_fused_gemm_kernel", "b_ptr + ",
                      "load", "outside b_ptr's view (shape (7, 3), strides (1, 7)")


def test_install_is_idempotent_and_uninstall_restores():
    from triton.runtime.interpreter import GridExecutor, InterpreterBuilder
    patched = (InterpreterBuilder.create_masked_load, GridExecutor.__call__)
    _bounds.install()
    assert (InterpreterBuilder.create_masked_load, GridExecutor.__call__) == patched
    _bounds.uninstall()
    try:
        assert not _bounds.installed()
        assert InterpreterBuilder.create_masked_load is not patched[0]
        assert GridExecutor.__call__ is not patched[1]
    finally:
        _bounds.install()
    assert _bounds.installed()
