"""Helpers shared by the tests: float64 comparisons with per-dtype tolerances."""
import contextlib
import importlib

import torch

# Relative (Frobenius) error allowed against a float64 reference, per output dtype.
# fp32 is fp32-accurate (interpreter, or 3xTF32 on the GPU); 16-bit outputs carry one
# final rounding (2**-11 for fp16, 2**-8 for bf16) plus accumulation-order noise.
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2,
           torch.float64: 1e-12}
TF32_REL_TOL = 5e-3


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """||actual - ref|| / ||ref|| in float64 (0 when both are empty or zero)."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == r.shape, f"shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    assert not torch.isnan(a).any(), "NaN in result"
    denom = r.norm().item()
    num = (a - r).norm().item()
    return num / denom if denom > 0 else num


def assert_close_to_ref(actual, ref, dtype=None, tol=None, what="result"):
    """Assert ``actual`` matches the float64 ``ref`` within the tolerance of ``dtype``."""
    dtype = dtype or actual.dtype
    tol = tol if tol is not None else REL_TOL[dtype]
    err = rel_err(actual, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"
    return err


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Random normal data (never zeros) in ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


@contextlib.contextmanager
def counted_launches():
    """Counts every Triton kernel launch of fastlayers' kernels (the launch still runs)."""
    counts = []
    patched = []
    for name in ("fixed_hidden_mlp", "halve_until", "gemm", "centered"):
        mod = importlib.import_module(f"fastlayers.kernels.{name}")
        for attr, fn in vars(mod).items():
            if attr.endswith("_kernel") and hasattr(fn, "run"):
                def run(*args, _fn=fn, _run=fn.run, _name=attr, **kwargs):
                    counts.append(_name)
                    return _run(*args, **kwargs)
                patched.append(fn)
                fn.run = run
    try:
        yield counts
    finally:
        for fn in patched:
            del fn.run
