"""64-bit offsets where a product of sizes passes 2**31 (an int32 product wraps before any
later cast and lands 4 GiB before the tensor). The large tensors here are address space:
``torch.empty`` on a CPU touches only the pages a test writes or a kernel reads. Under the
interpreter every access is bounds-checked (tests/_bounds.py); a program far into a huge
grid is run alone by shifting the interpreter's program id."""
import contextlib

import pytest
import torch

import fastlayers
from fastlayers import functional as F

from _util import REL_TOL, assert_close_to_ref, counted_launches
from conftest import HAS_CUDA, requires_triton


def _slice_of_wide(rows, cols, stride, dtype, device):
    """[rows, cols] random values in the first columns of a [rows, stride] allocation
    (address space: only the pages written are touched)."""
    x = torch.empty(rows, stride, dtype=dtype, device=device)[:, :cols]
    x.copy_(torch.randn(rows, cols, dtype=torch.float64))
    return x


@contextlib.contextmanager
def program_id_plus(offset):
    """Under Triton's interpreter: program ids start at ``offset`` (int32, as on a GPU)."""
    from triton.runtime import interpreter
    original = interpreter.InterpreterBuilder.create_get_program_id

    def shifted(self, axis):
        handle = original(self, axis)
        if axis == 0:
            handle.data = handle.data + offset
        return handle
    interpreter.InterpreterBuilder.create_get_program_id = shifted
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_get_program_id = original


def test_gemm_steps_along_k_in_64_bit(backend):
    """linear_relu's weight gradient reduces over the batch of a column slice of a wide
    matrix: each K step moves BLOCK_K * 2**26 >= 2**31 elements (x's row stride)."""
    x = _slice_of_wide(33, 16, 2**26, torch.float16, backend)  # K = 33: two K steps
    w = torch.randn(8, 16, dtype=torch.float16, device=backend, requires_grad=True)
    b = torch.randn(8, dtype=torch.float16, device=backend, requires_grad=True)
    y = F.linear_relu(x, w, b)
    g = torch.randn(y.shape, dtype=torch.float64).to(y)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.relu(x64 @ w64.T + b64)
    y64.backward(g.double())
    assert_close_to_ref(y, y64)
    assert_close_to_ref(w.grad, w64.grad, tol=4 * REL_TOL[torch.float16])
    assert_close_to_ref(b.grad, b64.grad, tol=4 * REL_TOL[torch.float16])


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_launches_past_max_dim_in_slices(monkeypatch, dtype):
    """C's rows and columns past kernels.gemm.MAX_DIM (2**30: the kernel's tile starts are
    int32) go in slices: forward and both gradients (gate, bias, the bias gradient's row
    sums) as one launch gives them (bitwise under the interpreter's fixed tile; a GPU picks
    tiles by shape), with MAX_DIM lowered to 20."""
    from fastlayers.kernels import gemm
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(45, 33, dtype=torch.float64).to(device, dtype)
    w = torch.randn(50, 33, dtype=torch.float64).to(device, dtype)
    b = torch.randn(50, dtype=torch.float64).to(device, dtype)
    g = torch.randn(45, 50, dtype=torch.float64).to(device, dtype)

    def run():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        with fastlayers.use_backend("triton"), counted_launches() as launches:
            y = F.linear_relu(xs, ws, bs)
            y.backward(g)
        return (y.detach(), xs.grad, ws.grad, bs.grad), len(launches)
    whole, n_whole = run()
    monkeypatch.setattr(gemm, "MAX_DIM", 20)
    sliced, n_sliced = run()
    # blocks of 20: forward [45, 50] 3 x 3, input gradient [45, 33] 3 x 2, weight gradient
    # [50, 33] 3 x 2
    assert (n_whole, n_sliced) == (3, 9 + 6 + 6)
    for name, one, many in zip(("y", "dx", "dw", "db"), whole, sliced):
        if HAS_CUDA:  # a GPU picks tiles and split-K by shape: another summation order
            assert_close_to_ref(many, one.double(), dtype, what=name)
        else:
            assert torch.equal(one, many), name


def test_fixed_hidden_mlp_reads_a_feature_major_batch(backend):
    """x = the first samples of a [features, samples] tensor: (d - 1) * 2**27 >= 2**31."""
    d = 20
    x = _slice_of_wide(d, 3, 2**27, torch.float16, backend).t()
    w = (torch.randn(d, d, dtype=torch.float64) * 0.2).to(torch.float16).to(backend)
    b = torch.randn(d, dtype=torch.float64).to(torch.float16).to(backend)
    r = torch.rand(d, d, dtype=torch.float64).to(torch.float16).to(backend)
    got, k = F.fixed_hidden_mlp(x, w, b, r, return_count=True)
    want, k_dense = F.fixed_hidden_mlp(x.contiguous(), w, b, r, return_count=True)
    assert int(k) == int(k_dense) and torch.equal(got, want)


@requires_triton
def test_centered_segment_index_is_64_bit(monkeypatch):
    """2**31 + 64 rows centered over a size-1 dim: the last program's first row is 2**31.
    Interpreter: that program alone, with its id shifted; a GPU: the whole launch."""
    from fastlayers.kernels import centered as K
    A = 2**31 + 64
    x = torch.empty(A, 1, dtype=torch.float16, device="cuda" if HAS_CUDA else "cpu")
    x[-64:] = torch.arange(1, 65, dtype=torch.float16).view(64, 1)
    if HAS_CUDA:
        with fastlayers.use_backend("triton"):
            y = F.centered(x, -1)
        assert torch.equal(y[-64:], torch.zeros(64, 1, dtype=torch.float16, device="cuda"))
        return
    y = torch.empty_like(x)
    y[-64:] = 7.0  # only the last rows are computed and checked
    x3, y3 = x.view(A, 1, 1), y.view(A, 1, 1)
    monkeypatch.setattr(K, "interpreting", lambda: False)  # the GPU's tile
    ba, bc, bi, one = K._segment_tile(x3)
    last = (A - 1) // ba
    assert last * ba == 2**31  # the program under test starts at row 2**31
    with program_id_plus(last):
        K._center_segments_kernel[(1,)](x3, y3, A, 1, 1, *x3.stride(), *y3.stride(),
                                        BLOCK_A=ba, BLOCK_C=bc, BLOCK_I=bi, ONE_SWEEP=one)
    assert torch.equal(y[-64:], torch.zeros(64, 1, dtype=torch.float16))  # x - x: 0
