"""Centering, x - mean(x): kernels (interpreter on CPU, GPU with CUDA) and the torch fallback
against float64; every kernel path across its block boundaries; strides, autograd, gradcheck,
opcheck, compile, the module, errors; CUDA-only tests for the one-launch path and big sizes."""
import pytest
import torch
import torch.nn as nn

import fastlayers
from fastlayers import functional as F
from fastlayers.ops import centered as ops

from _util import REL_TOL, assert_close_to_ref, randn, rel_err
from conftest import HAS_TRITON, KERNEL_DEVICE, requires_triton

if HAS_TRITON:
    from fastlayers.kernels import centered as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn_shape(shape, **kw):
    """_util.randn for any shape, 0-d included."""
    return randn(*shape, **kw) if shape else randn(1, **kw).view(())


def ref64(x, dim=None):
    """The independent oracle: torch's own mean and subtraction in float64."""
    x = x.detach().double()
    return x - x.mean() if dim is None else x - x.mean(dim, keepdim=True)


def ref64_grad(x, dim, gy):
    x64 = x.detach().double().requires_grad_(True)
    y = x64 - x64.mean() if dim is None else x64 - x64.mean(dim, keepdim=True)
    y.backward(gy.double())
    return x64.grad


# (shape, dim): 0-d, ones, primes, the interpreter's 32/64 boundaries, middle/outer/split
# dims, all dims, empty tensors.
CASES = [((), None), ((1,), None), ((7,), None), ((33,), None), ((97,), None), ((4, 8), None),
         ((3, 5, 7), None), ((5, 33), -1), ((5, 33), 0), ((3, 4, 5), 1), ((3, 4, 5), (0, 2)),
         ((3, 4, 5), (-1, 0, 1)), ((2, 65), 1), ((67, 3), 0), ((1, 31), -1), ((), 0),
         ((0,), None), ((2, 0, 3), 1), ((2, 0, 3), 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_forward_backward_match_float64(backend, shape, dim, dtype):
    x = randn_shape(shape, dtype=dtype, device=backend).requires_grad_(True)
    y = F.centered(x, dim)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_close_to_ref(y, ref64(x, None if dim == 0 and x.dim() == 0 else dim), dtype)
    gy = randn_shape(shape, dtype=dtype, device=backend)
    y.backward(gy)
    assert_close_to_ref(x.grad, ref64_grad(x, None if x.dim() == 0 else dim, gy), dtype,
                        what="grad")


# Sizes across the interpreter config: one-sweep limit 32, tile 64 (the persistent kernel's
# tile too: it runs as one program looping over tiles there), split block 32 with up to 4
# chunks. On a GPU these are small cases; the CUDA tests below cover GPU-sized boundaries.
GLOBAL_SIZES = [1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1031]
ROW_SHAPES = [(3, 31), (3, 32), (3, 33), (65, 5), (2, 129), (5, 64), (5, 65), (1, 7), (130, 1)]


@requires_triton
@pytest.mark.parametrize("path", ["segments", "split", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_kernel_path_across_block_boundaries(path, dtype):
    for n in GLOBAL_SIZES:
        x = randn(n, dtype=dtype, device=KERNEL_DEVICE, scale=3.0) + 2.0
        assert_close_to_ref(K.centered(x, [], path), ref64(x), dtype, what=f"n={n}")
    if path == "persistent":
        with pytest.raises(ValueError, match="all elements"):
            K.centered(randn(3, 4, device=KERNEL_DEVICE), [1], path)
        return
    for shape in ROW_SHAPES:
        x = randn(*shape, dtype=dtype, device=KERNEL_DEVICE) + 1.0
        for dims in ([1], [0]):
            assert_close_to_ref(K.centered(x, dims, path), ref64(x, dims[0]), dtype,
                                what=f"{shape} dims={dims}")
    x = randn(3, 37, 5, dtype=dtype, device=KERNEL_DEVICE)  # middle dim, 3-D tiles
    assert_close_to_ref(K.centered(x, [1], path), ref64(x, 1), dtype, what="middle")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "permuted", "offset"])
@pytest.mark.parametrize("dim", [None, -1, 0, (0, 2)])
def test_non_contiguous_inputs(backend, layout, dim):
    if layout == "transposed":
        x = randn(3, 37, 5, device=backend).transpose(0, 2)
    elif layout == "sliced":
        x = randn(6, 37, 10, device=backend)[::2, :, 1::3]
    elif layout == "expanded":
        x = randn(1, 37, 1, device=backend).expand(3, 37, 4)
        x = x + randn(3, 1, 4, device=backend)  # not constant along any dim...
        x = x[:, :, :1].expand(3, 37, 4)        # ...then stride 0 again in the last dim
    elif layout == "permuted":
        x = randn(5, 3, 37, device=backend).permute(1, 2, 0)
    else:
        x = randn(3 * 37 * 5 + 11, device=backend)[11:].view(3, 37, 5)
    x.requires_grad_(True)
    y = F.centered(x, dim)
    assert_close_to_ref(y, ref64(x, dim), what=layout)
    gy = randn(*x.shape, device=backend).transpose(0, 1).contiguous().transpose(0, 1)
    y.backward(gy)
    assert_close_to_ref(x.grad, ref64_grad(x, dim, gy), what="grad")


@pytest.mark.parametrize("dim", [None, -1, (0, 1)])
def test_stride_zero_grads(backend, dim):
    """.sum() hands backward an expanded (stride 0) gradient; it must still be right."""
    x = randn(9, 33, device=backend).requires_grad_(True)
    w = randn(33, device=backend)
    (F.centered(x, dim).sum(0) * w).sum().backward()  # grad_y = w expanded, stride (0, 1)
    assert_close_to_ref(x.grad, ref64_grad(x, dim, w.expand(9, 33)))
    x.grad = None
    F.centered(x, dim).sum().backward()  # all-ones grad: centering it gives exact zeros
    assert x.grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [None, -1])
def test_16bit_mean_is_accumulated_and_applied_in_fp32(backend, dtype, dim):
    """Data with a large mean: rounding the mean to 16 bits (as plain torch does) would be
    visible in the result; ours rounds once, at the end."""
    x = (randn(16, 33, dtype=torch.float64, device=backend) + 300.0).to(dtype)
    mean = x.mean() if dim is None else x.mean(dim, keepdim=True)
    naive = x - mean  # torch's 16-bit arithmetic
    assert rel_err(naive, ref64(x, dim)) > REL_TOL[dtype], "data too easy to tell the two apart"
    assert_close_to_ref(F.centered(x, dim), ref64(x, dim), dtype)


# inf - inf = nan is the point here; the interpreter's numpy warns about it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_matches_torch_on_inf_and_nan(backend):
    x = randn(4, 33, device=backend)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    for dim in (None, -1, 0):
        torch.testing.assert_close(F.centered(x, dim), ref64(x, dim).float(), equal_nan=True)


@requires_triton
@pytest.mark.parametrize("path", ["segments", "split", "persistent", None])
def test_kernel_results_are_bitwise_repeatable(path):
    x = randn(200, device=KERNEL_DEVICE, scale=5.0)
    rows = randn(6, 70, device=KERNEL_DEVICE)
    for _ in range(2):
        assert torch.equal(K.centered(x, [], path), K.centered(x.clone(), [], path))
        if path != "persistent":
            assert torch.equal(K.centered(rows, [1], path), K.centered(rows.clone(), [1], path))


def test_gradcheck_float64():
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    for dim in (None, -1, (0, 2)):
        assert torch.autograd.gradcheck(lambda t: F.centered(t, dim), (x,))
        assert torch.autograd.gradgradcheck(lambda t: F.centered(t, dim), (x,))
    # The op-level backward (used under torch.compile) too.
    assert torch.autograd.gradcheck(lambda t: ops.fwd_op(t, [1]), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.fwd_op(t, []), (x,))


@pytest.mark.parametrize("case", ["global", "rows", "middle", "transposed", "sliced", "bf16"])
def test_opcheck(backend, case):
    x, dims = randn(5, 37, device=backend), [1]
    if case == "global":
        dims = []
    elif case == "middle":
        x, dims = randn(3, 37, 5, device=backend), [1]
    elif case == "transposed":
        x, dims = randn(37, 5, device=backend).t(), [0]
    elif case == "sliced":
        x, dims = randn(5, 74, device=backend)[:, ::2], []
    elif case == "bf16":
        x = x.bfloat16()
    torch.library.opcheck(ops.fwd_op, (x.requires_grad_(True), dims))


@pytest.mark.parametrize("dims", [[-1], [2, 0], [0, 1, 2], [-3, 1]])
def test_the_op_called_directly_takes_dims_as_centered_does(backend, dims):
    """torch.ops.fastlayers.centered_fwd (differentiable on its own) with negative,
    unsorted or all dims: the values and gradient of F.centered on either path."""
    x = randn(4, 5, 3, device=backend).requires_grad_(True)
    y = torch.ops.fastlayers.centered_fwd(x, dims)
    assert_close_to_ref(y, ref64(x, dims))
    gy = randn(4, 5, 3, device=backend)
    y.backward(gy)
    assert_close_to_ref(x.grad, ref64_grad(x, dims, gy))
    torch.library.opcheck(ops.fwd_op, (x, dims))


@pytest.mark.parametrize("dims, exc, words", [
    ([1, 1], ValueError, ["dim 1", "more than once"]),
    ([5], IndexError, ["dim 5", "out of range"]), ([-4], IndexError, ["dim -4", "3 dims"])])
def test_the_op_called_directly_refuses_bad_dims_clearly(backend, dims, exc, words):
    with pytest.raises(exc) as info:
        torch.ops.fastlayers.centered_fwd(randn(2, 3, 4, device=backend), dims)
    for word in words + ["centered_fwd"]:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("dim", [None, -1])
def test_compile_fullgraph_matches_eager(backend, dim):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(8, 33), fastlayers.CenteredLayer(dim)).to(backend)
    x = randn(4, 3, 8, device=backend).requires_grad_(True)
    eager_y = net(x)
    eager_y.square().sum().backward()
    eager_grads = [x.grad.clone(), net[0].weight.grad.clone()]
    x.grad = None
    net.zero_grad()
    y = torch.compile(net, fullgraph=True)(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close([x.grad, net[0].weight.grad], eager_grads)


def test_seed_check_and_printable_structure(backend):
    """The seed: net = nn.Sequential(nn.Linear(8, 128), CenteredLayer()); net(X).mean() ~ 0."""
    net = nn.Sequential(nn.Linear(8, 128), fastlayers.CenteredLayer()).to(backend)
    X = torch.rand(4, 8, device=backend)
    Y = net(X)
    assert abs(Y.mean().item()) < 1e-6
    assert_close_to_ref(Y, ref64(net[0](X)))
    assert str(net) == ("Sequential(\n  (0): Linear(in_features=8, out_features=128, bias=True)\n"
                        "  (1): CenteredLayer()\n)")
    assert repr(fastlayers.CenteredLayer(dim=-1)) == "CenteredLayer(dim=-1)"
    assert repr(fastlayers.CenteredLayer(dim=[0, 2])) == "CenteredLayer(dim=(0, 2))"
    assert list(fastlayers.CenteredLayer().state_dict()) == []
    layer = fastlayers.CenteredLayer(dim=1)
    Z = randn(3, 17, 4, device=backend)
    assert_close_to_ref(layer(Z), ref64(Z, 1))


@pytest.mark.parametrize("call, exc, words", [
    (lambda: F.centered(torch.arange(6).view(2, 3)), TypeError, ["floating-point", "torch.int64"]),
    (lambda: F.centered(torch.randn(2, 3), 2), IndexError, ["dim 2", "out of range", "[-2, 1]"]),
    (lambda: F.centered(torch.randn(2, 3), -3), IndexError, ["dim -3", "2 dims"]),
    (lambda: F.centered(torch.randn(2, 3, 4), (0, -3)), ValueError, ["dim 0", "more than once"]),
    (lambda: F.centered(torch.randn(2, 3), 1.0), TypeError, ["dim must be", "1.0"]),
    (lambda: F.centered(torch.randn(2, 3), (True,)), TypeError, ["dim must be"]),
    (lambda: F.centered([1.0, 2.0]), TypeError, ["torch.Tensor", "list"]),
    (lambda: fastlayers.CenteredLayer(dim=(1, 1)), ValueError, ["dim 1", "more than once"]),
])
def test_bad_input_gets_clear_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_kernel_with_the_gpus_tile(dtype):
    """The GPU's persistent tile (GPU_CONFIG persistent_tile_elems, 16 warps), run in the
    interpreter as one program: several tiles, a partial last one, an odd size."""
    block = K.GPU_CONFIG["persistent_tile_elems"]
    for n in (block - 3, 2 * block + 5):
        x = randn(n, dtype=dtype, device=KERNEL_DEVICE) * 3 + 1.5
        y = torch.empty_like(x)
        plan = K.persistent_plan_for(n, block, 1)
        assert plan[0] == block and plan[1] == 1 and plan[3] == 16
        K._launch_persistent(x, y, plan)
        assert_close_to_ref(y, ref64(x), dtype, what=f"n={n}")
    # On an H200 (132 SMs) the benchmark's 2**22 fp32 gets 64 KiB tiles, 2 per program.
    assert K.persistent_plan_for(2 ** 22, block, 132)[1:] == (132, 2, 16)


@requires_triton
def test_bad_kernel_path_is_a_clear_error():
    with pytest.raises(ValueError, match="path must be"):
        K.centered(randn(4, device=KERNEL_DEVICE), [], "fast")


def test_float64_falls_back_to_torch_even_on_triton_backend():
    with fastlayers.use_backend("triton"):
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(F.centered(x, -1), x - x.mean(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_path_is_x_minus_x_mean_bitwise(dtype):
    """The torch path of the seed's CenteredLayer is torch's own ``x - x.mean()`` bit for
    bit, values and gradients: power-of-two sizes (which take ``x - x.sum() * 2**-j``, one
    op fewer) and other sizes alike, at magnitudes from 1e-30 to 1e30."""
    layouts = {"transposed": lambda t: t.t().contiguous().t(),
               "sliced": lambda t: torch.stack([t, -t], -1)[..., 0],  # last stride 2
               "expanded": lambda t: t[..., :1].expand(t.shape)}
    for shape, scale, layout in [
            ((1,), 1.0, None), ((4, 128), 1.0, None), ((2, 3, 64), 1e30, None),
            ((256,), 1e-30, None), ((5,), 1.0, None), ((4, 100), 1e-3, None),
            ((1031,), 7.0, None), ((4, 128), 3.0, "transposed"), ((16, 8), 1.0, "sliced"),
            ((4, 128), 1.0, "expanded"), ((5, 7), 1.0, "transposed")]:
        x = randn(*shape, dtype=dtype) * scale + 0.5 * scale
        if layout:
            x = layouts[layout](x)
            assert not x.is_contiguous(), layout
        x.requires_grad_(True)
        gy = randn(*shape, dtype=dtype)
        with fastlayers.use_backend("torch"):
            y = fastlayers.CenteredLayer()(x)
        want = x - x.mean()
        assert torch.equal(y, want), (shape, layout)
        assert torch.equal(torch.autograd.grad(y, x, gy)[0],
                           torch.autograd.grad(want, x, gy)[0]), (shape, layout)


# ------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_one_launch_path_matches_float64_and_resets_its_barrier(dtype):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    esize = torch.empty((), dtype=dtype).element_size()
    cap = K.GPU_CONFIG["persistent_max_bytes"] // esize
    one_tile_each = K.GPU_CONFIG["persistent_programs_per_sm"] * sms * \
        K.GPU_CONFIG["persistent_tile_elems"]  # beyond this, programs loop over tiles
    stream = torch.cuda.Stream()
    sizes = (1, 1000, 2 ** 16, 2 ** 16 + 1, one_tile_each, one_tile_each + 1, 2 ** 20 + 3,
             2 ** 22, cap - 1, cap)
    for n in sizes:
        x = randn(n, dtype=dtype, device="cuda") + 1.5
        with fastlayers.use_backend("triton"):
            y = K.centered(x, [], "persistent")
            assert_close_to_ref(y, ref64(x), dtype, what=f"n={n}")
            for _ in range(3):  # the barrier left itself reset: repeat runs agree bitwise
                assert torch.equal(F.centered(x), y)  # (the default path for this size)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # another stream has its own barrier state
                y2 = K.centered(x, [], "persistent")
            torch.cuda.current_stream().wait_stream(stream)
            assert torch.equal(y2, y)
    with pytest.raises(ValueError, match="more than the persistent path takes"):
        K.centered(randn(cap + 1, device="cuda"), [], "persistent")


@pytest.mark.cuda
def test_gpu_one_launch_path_under_cuda_graph_capture():
    x = randn(2 ** 20, device="cuda")
    K.centered(x, [], "persistent")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = K.centered(x, [], "persistent")
    for _ in range(3):
        x.copy_(randn(2 ** 20, device="cuda") * 2 - 1)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_ref(y, ref64(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sizes_beyond_one_launch_and_long_rows(dtype):
    cases = [((2 ** 24 + 3,), None), ((3, 2 ** 22 + 1), -1), ((2 ** 21 + 5, 3), 0),
             ((4097, 4095), -1), ((4095, 4097), 0), ((64, 8193), 1), ((8, 1000, 33), 1)]
    with fastlayers.use_backend("triton"):
        for shape, dim in cases:
            x = randn(*shape, dtype=dtype, device="cuda") + 0.5
            for path in (None, "split", "segments"):
                dims = [] if dim is None else [dim % x.dim()]
                y = K.centered(x, dims, path)
                assert_close_to_ref(y, ref64(x, dim), dtype, what=f"{shape} {dim} {path}")


@pytest.mark.cuda
def test_gpu_more_than_2_31_elements_uses_64_bit_offsets():
    """2**31 + 448 bf16 elements (4 GiB): global (split path) and per-row (segments)."""
    C = 64
    M = 2 ** 31 // C + 7
    x = torch.empty(M, C, device="cuda", dtype=torch.bfloat16)
    x.normal_()
    mean = x.sum(dtype=torch.float64) / x.numel()
    with fastlayers.use_backend("triton"):
        y = F.centered(x)
        for rows in (slice(0, 5), slice(M - 9, M), slice(2 ** 31 // C - 3, 2 ** 31 // C + 3)):
            assert_close_to_ref(y[rows], x[rows].double() - mean, what=f"rows {rows}")
        del y
        y = F.centered(x, -1)
        for rows in (slice(0, 5), slice(M - 9, M)):
            assert_close_to_ref(y[rows], ref64(x[rows], -1), what=f"rows {rows}")
    del x, y
    torch.cuda.empty_cache()
