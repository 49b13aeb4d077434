"""Which implementation runs an op: the Triton kernels or the plain-torch reference.

``FASTLAYERS_BACKEND`` (read once at import; change it later with :func:`set_backend`):

* ``auto`` (default): Triton for CUDA tensors, torch for every other device.
* ``torch``: torch everywhere (A/B runs on a GPU).
* ``triton``: Triton everywhere; CPU tensors then need ``TRITON_INTERPRET=1`` (Triton's
  interpreter) and get a clear error without it.

Dtypes the kernels do not support (float64, complex, ...) always run on torch.
"""
import contextlib
import os

import torch

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    from fastlayers import kernels as _kernels  # noqa: F401  (imports triton)
    TRITON_ERROR = None
except Exception as exc:  # triton missing or broken: pure-torch mode
    _kernels = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"FASTLAYERS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _check(os.environ.get("FASTLAYERS_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend in force: 'auto', 'torch' or 'triton'."""
    return _backend


def set_backend(name: str) -> str:
    """Choose the backend for later calls; returns the previous one."""
    global _backend
    previous, _backend = _backend, _check(name)
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed calls on backend ``name``."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    return _kernels is not None and _kernels.interpreting()


def _device_choice(device_type: str):
    """(path, reason) for kernel-supported dtypes on a device type."""
    if _backend == "torch":
        return "torch", "FASTLAYERS_BACKEND=torch"
    if _kernels is None:
        return "torch", f"triton unavailable ({TRITON_ERROR})"
    if device_type == "cuda":
        if interpreting():
            return "triton", "Triton interpreter (TRITON_INTERPRET=1), kernels run on the host"
        return "triton", "Triton kernels"
    if _backend == "triton":
        if interpreting():
            return "triton", "Triton interpreter (TRITON_INTERPRET=1)"
        return "error", "FASTLAYERS_BACKEND=triton on a non-CUDA device needs TRITON_INTERPRET=1"
    return "torch", "torch reference (no Triton kernels for this device)"


def use_triton(t: torch.Tensor) -> bool:
    """True when the op for tensor ``t`` should run the Triton kernel."""
    if t.dtype not in KERNEL_DTYPES or (_backend == "auto" and not t.is_cuda):
        return False  # the second test: _device_choice's answer, without its cost
    path, reason = _device_choice(t.device.type)
    if path == "error":
        raise RuntimeError(f"fastlayers: {reason} (tensor on {t.device})")
    return path == "triton"


def backend_info() -> dict:
    """Which path each device takes and why, plus versions: a dict, also handy to print."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "backend": _backend,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "interpreter": interpreting(),
        "kernel_dtypes": [str(d).replace("torch.", "") for d in KERNEL_DTYPES],
        "devices": {d: dict(zip(("path", "reason"), _device_choice(d))) for d in devices},
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _triton_version():
    if _kernels is None:
        return None
    import triton
    return triton.__version__


@torch.compiler.assume_constant_result
def fp32_matmul_mode() -> str:
    """'ieee' (fp32-accurate) or 'tf32', read from torch's switches the way torch does.

    Honours ``torch.backends.cuda.matmul.fp32_precision`` (new API) and, where that is
    unset, ``torch.get_float32_matmul_precision()`` / ``allow_tf32`` (legacy API):
    'highest' means fp32-accurate, 'high' and 'medium' allow TF32. torch.compile reads it
    once, when it traces (as inductor does for torch's own matmuls).
    """
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", "none")
    if new in ("ieee", "tf32"):
        return new
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:  # torch refuses the legacy query after mixed API use
        return "tf32" if matmul.allow_tf32 else "ieee"
