"""Test setup: Triton's interpreter on machines without a GPU, shared fixtures.

Without CUDA, ``TRITON_INTERPRET=1`` is set before anything imports triton, so the
kernel tests run the real Triton kernels on CPU tensors. With CUDA they run on the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlayers  # noqa: E402  (after TRITON_INTERPRET is set)
from fastlayers import _backend, settings  # noqa: E402

import _bounds  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _backend.TRITON_ERROR is None
if not HAS_TRITON and settings.require_triton:
    # CI sets this: a kernel test skipped for a broken triton install proves nothing.
    raise RuntimeError(f"FASTLAYERS_REQUIRE_TRITON=1 but triton is unusable: {_backend.TRITON_ERROR}")
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
# Under the interpreter every kernel load/store is checked against the tensors passed to
# the kernel (tests/_bounds.py); FASTLAYERS_BOUNDS_CHECK=0 switches the check off.
if HAS_TRITON and _backend.interpreting() and settings.bounds_check:
    _bounds.install()
requires_triton = pytest.mark.skipif(
    not HAS_TRITON, reason=f"triton is not installed here ({_backend.TRITON_ERROR})")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Run the test through the Triton kernels (interpreter on CPU) and the torch fallback.
    Yields the device the test should put its tensors on."""
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip(f"triton is not installed here ({_backend.TRITON_ERROR})")
    with fastlayers.use_backend(request.param):
        yield KERNEL_DEVICE if request.param == "triton" else ("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    found = _bounds.take_violations()  # also those an exception handler swallowed
    assert not found, "out-of-bounds kernel accesses:\n" + "\n".join(found)
