"""halve_until's launch plans on the kernel path: one launch up to ONE_MAX elements, then
partials, count and scale, with the seed loop's values on either plan (NaN and inf inputs
included), and no device-to-host sync on CUDA on either path."""
import math

import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers import functional as F
from fastlayers.ops import halve_until as H

from _util import counted_launches
from conftest import KERNEL_DEVICE, requires_triton

# the interpreter's numpy warns on fp32 overflow to inf, which these tests mean to cause
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_device_to_host_sync_on_cuda(backend_name, dtype):
    x = (torch.randn(4096, 20, device="cuda") * 30).to(dtype)
    with fastlayers.use_backend(backend_name):
        F.halve_until(x)  # warm up (compiles, caches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, k = F.halve_until(x, return_count=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref, ref_k = reference.halve_until_loop(x, 1.0)
    assert int(k) == ref_k and torch.equal(y, ref)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_small_tensor_is_one_launch(dtype):
    """Up to ONE_MAX elements the kernel path is one launch (count and halving in one
    program); one more element takes partials, count and scale. Same values either way."""
    from fastlayers.kernels import halve_until as kh
    for n, want in ((1, ["_halve_one_kernel"]), (kh.ONE_MAX, ["_halve_one_kernel"]),
                    (kh.ONE_MAX + 1, ["_halve_partials_kernel", "_halve_count_kernel",
                                      "_halve_scale_kernel"])):
        x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 50).to(dtype)
        with fastlayers.use_backend("triton"), counted_launches() as launches:
            y, k = F.halve_until(x.to(KERNEL_DEVICE), return_count=True)
        assert launches == want, f"n={n}: {launches}"
        ref, ref_k = reference.halve_until_loop(x, 1.0)
        assert int(k) == ref_k and torch.equal(y.cpu(), ref), f"n={n}"


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [7, 4097], ids=["one-program", "three-launches"])
def test_nan_and_inf_on_both_launch_plans(dtype, n):
    """NaN anywhere: the seed's loop stops at once (k = 0, y = x bit for bit). ±inf and no
    NaN: the loop never ends; the limit (finite elements -> zeros of their sign, ±inf
    kept) with k = K_FOREVER. n = 4097 takes partials, count and scale (ONE_MAX = 4096)."""
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 40).to(dtype)
    with fastlayers.use_backend("triton"):
        x_nan = x.clone()
        x_nan[n // 2] = math.nan
        y, k = F.halve_until(x_nan.to(KERNEL_DEVICE), return_count=True)
        assert int(k) == 0 and torch.equal(y.cpu().view(bits), x_nan.view(bits))
        x_inf = x.clone()
        x_inf[n - 1], x_inf[0] = math.inf, -math.inf
        y, k = F.halve_until(x_inf.to(KERNEL_DEVICE), return_count=True)
    want = torch.where(torch.isinf(x_inf), x_inf, torch.copysign(torch.zeros_like(x_inf), x_inf))
    assert int(k) == H.K_FOREVER and torch.equal(y.cpu().view(bits), want.view(bits))
