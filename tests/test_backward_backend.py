"""A backward runs on the path its forward took, wherever autograd runs it: in another
thread (on CUDA autograd runs a backward in the device's worker thread, where the caller's
``use_backend`` is not in force) or after the caller's ``use_backend`` block has closed.
Each op's forward runs under ``use_backend(path)`` while the process default is the other
path; its backward, away from that block, must launch the kernels exactly when the forward
did, and give float64 torch's gradients."""
import threading

import pytest
import torch

import fastlayers
from fastlayers import functional as F

from _util import assert_close_to_ref, counted_launches, randn
from conftest import HAS_CUDA, HAS_TRITON, KERNEL_DEVICE


def _linear_relu(x, w, b, _r):
    return F.linear_relu(x, w, b), torch.relu(x @ w.T + b)


def _centered(x, _w, _b, _r):
    return F.centered(x, 0), x - x.mean(0, keepdim=True)


def _fixed_hidden(x, _w, _b, r):
    return F.fixed_hidden(x, r, 1.0), torch.relu(x @ r + 1.0)


def _fixed_hidden_mlp(x, w, b, r):
    """The reference halves the body by the op's own count k (piecewise constant)."""
    y, k = F.fixed_hidden_mlp(x, w, b, r, return_count=True)
    h = torch.relu((x @ w.T + b) @ r + 1.0)
    return y, (h @ w.T + b) * 2.0 ** -int(k)


OPS = {"linear_relu": _linear_relu, "centered": _centered, "fixed_hidden": _fixed_hidden,
       "fixed_hidden_mlp": _fixed_hidden_mlp}


def _backward_elsewhere(where, y, g):
    if where == "after the block":
        y.backward(g)
        return
    failure = []

    def run():
        try:
            y.backward(g)
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@pytest.mark.parametrize("where", ["another thread", "after the block"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_backward_takes_the_forwards_path(path, op, where):
    if path == "triton" and not HAS_TRITON:
        pytest.skip(f"triton is not installed here ({fastlayers._backend.TRITON_ERROR})")
    device = KERNEL_DEVICE if path == "triton" else ("cuda" if HAS_CUDA else "cpu")
    x = randn(7, 13, device=device).requires_grad_(True)
    w = randn(13, 13, device=device).requires_grad_(True)
    b = randn(13, device=device).requires_grad_(True)
    r = randn(13, 13, device=device)
    other = "torch" if path == "triton" else "triton"
    previous = fastlayers.set_backend(other)
    try:
        with fastlayers.use_backend(path), counted_launches() as forward_launches:
            y, _ = OPS[op](x, w, b, r)
        g = randn(*y.shape, device=device)
        with counted_launches() as backward_launches:
            _backward_elsewhere(where, y, g)
    finally:
        fastlayers.set_backend(previous)
    assert bool(forward_launches) == (path == "triton"), forward_launches
    assert bool(backward_launches) == (path == "triton"), (
        f"forward on {path}, backward launches {backward_launches}")
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    _, y64 = OPS[op](x64, w64, b64, r.double())
    y64.backward(g.double())
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        if want is not None:
            assert_close_to_ref(got, want, tol=1e-5, what=f"{op} gradient")
