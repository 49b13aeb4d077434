"""Which implementation runs an op: the Triton kernels or the plain-torch reference.

The backend (``FASTLAYERS_BACKEND``, parsed once by :mod:`fastlayers.settings`):

* ``auto`` (default): Triton for CUDA tensors, torch for every other device.
* ``torch``: torch everywhere (A/B runs on a GPU).
* ``triton``: Triton on CUDA and, under ``TRITON_INTERPRET=1`` (Triton's interpreter), on
  CPU tensors; CPU tensors without the interpreter get a clear error.

:func:`use_triton` is the one rule every op asks, once per call. Whatever the backend, torch
runs: dtypes the kernels do not support (float64, complex, ...), meta tensors (shapes only),
calls under ``torch.func`` transforms and forward-mode AD (functorch needs batching and jvp
rules the kernels do not have; torch's own ops have them), and ``torch.jit.trace`` (it
records torch ops; a Triton launch cannot be recorded). ONNX export takes plain torch
too: each op's entry point in ``fastlayers.ops`` checks for it on its kernel branch
(linear_relu, centered: the torch path) or the functional form hands the halving ops their
loop-free bodies (:mod:`fastlayers.onnx_export`).

:func:`set_backend` changes the process default; :func:`use_backend` overrides it for the
enclosed code in the current thread / asyncio task only (a ``contextvars`` variable); a
backward runs under its forward's backend (:func:`in_forward_backend`).
"""
import contextlib
import contextvars
import functools
import importlib
import os

import torch
import torch.autograd.forward_ad as _fwd_ad

from . import settings
from ._validate import plain
from .settings import BACKENDS  # noqa: F401  (re-exported)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    from fastlayers import kernels as _kernels  # noqa: F401  (imports triton)
    TRITON_ERROR = None
except Exception as exc:  # triton missing or broken: pure-torch mode
    _kernels = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"
settings._push_to_kernels()

_override = contextvars.ContextVar("fastlayers_backend", default=None)
_jit_tracing = torch._C._get_tracing_state  # not None while torch.jit.trace records


def kernel_module(name: str):
    """``fastlayers.kernels.<name>``, or None when triton is unusable (then
    :func:`use_triton` is always False and the module is never touched)."""
    return None if _kernels is None else importlib.import_module(f"fastlayers.kernels.{name}")


@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The backend in force here: 'auto', 'torch' or 'triton'. torch.compile reads it
    when it traces (a later change needs ``torch.compiler.reset()`` to take effect)."""
    return _override.get() or settings.backend


def set_backend(name: str) -> str:
    """Set the process-wide default backend (any case); returns the previous default."""
    return settings.update(backend=name)["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed calls on backend ``name`` (any case), in this thread or asyncio task
    only; other threads and the process default are untouched. Generators share their
    caller's context: do not interleave two generators that each hold a use_backend."""
    token = _override.set(settings.parse_backend("FASTLAYERS_BACKEND", name))
    try:
        yield
    finally:
        _override.reset(token)


def in_forward_backend(backward):
    """Decorate an autograd backward ``backward(ctx, *grads)`` to run under the backend its
    forward ran under: ``ctx.backend``, which the forward sets to :func:`get_backend`.

    Autograd may run a backward in another thread (on CUDA, the device's worker thread,
    where the caller's :func:`use_backend` is not in force) or after the caller's
    ``use_backend`` block has closed; the backward's ops would otherwise choose their path
    by the backend there. Eager only: a compiled backward's ops choose where they run.
    """
    @functools.wraps(backward)
    def run(ctx, *grads):
        name = getattr(ctx, "backend", None)
        if torch.compiler.is_compiling() or name is None or name == get_backend():
            return backward(ctx, *grads)
        token = _override.set(name)
        try:
            return backward(ctx, *grads)
        finally:
            _override.reset(token)
    return run


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _kernels is not None and _kernels.interpreting()


def _device_choice(device_type: str, backend: str = None):
    """(path, reason) for kernel-supported dtypes on a device type."""
    backend = backend or get_backend()
    if backend == "torch":
        return "torch", "FASTLAYERS_BACKEND=torch"
    if _kernels is None:
        return "torch", f"triton unavailable ({TRITON_ERROR})"
    if device_type == "meta":
        return "torch", "meta tensors: shapes only, from torch's meta kernels"
    if device_type == "cuda":
        if interpreting():
            return "triton", "Triton interpreter (TRITON_INTERPRET=1), kernels run on the host"
        return "triton", "Triton kernels"
    if backend == "triton" and device_type == "cpu":
        if interpreting():
            return "triton", "Triton interpreter (TRITON_INTERPRET=1)"
        if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
            return "error", ("TRITON_INTERPRET=1 was set after triton was imported; set it "
                             "before importing fastlayers (or triton)")
        return "error", "FASTLAYERS_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1"
    if backend == "triton":
        return "error", f"FASTLAYERS_BACKEND=triton: no Triton kernels for {device_type} tensors"
    return "torch", "torch reference (no Triton kernels for this device)"


def _torch_only_context() -> bool:
    """True under torch.func transforms (also while torch.compile traces one) or eager
    forward-mode AD (see module doc)."""
    # isinstance, not "is not None": Dynamo hands back the answer wrapped as an object,
    # None included
    if isinstance(torch._C._functorch.peek_interpreter_stack(), _CInterpreter):
        return True
    return not torch.compiler.is_compiling() and _fwd_ad._current_level >= 0


_CInterpreter = torch._C._functorch.CInterpreter  # a torch.func transform's level
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # autograd's own vmap


def use_triton(t: torch.Tensor, *others) -> bool:
    """True when the op for tensor ``t`` should run the Triton kernel (the one rule).
    others: the op's other tensor inputs (None allowed); the kernels read only dense
    (strided, not nested) tensors without a negative bit, so a sparse, nested,
    negative-bit, legacy-batched or subclass (DTensor, ...) one sends the op to torch's
    ops."""
    backend = get_backend()
    if backend == "auto" and not t.is_cuda:
        return False  # _device_choice's answer, without its cost (the CPU default first)
    if t.dtype not in KERNEL_DTYPES:
        return False
    if not torch.compiler.is_compiling() and not all(  # (Dynamo: dense fake tensors)
            o is None or (plain(o) and o.layout is torch.strided and not o.is_nested
                          and not o.is_neg() and not _legacy_batched(o))
            for o in (t, *others)):
        return False  # (a negative-bit view's memory holds -x: torch's ops resolve it; a
        # batched gradient of autograd.grad(is_grads_batched=True) has no memory to read)
    path, reason = _device_choice(t.device.type, backend)
    if path == "error":
        raise RuntimeError(f"fastlayers: {reason} (tensor on {t.device})")
    # torch.jit.trace records torch ops; it cannot record a Triton launch
    return path == "triton" and not _torch_only_context() and _jit_tracing() is None


def backend_info() -> dict:
    """Which path each device takes and why, plus versions: a dict, also handy to print."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "backend": get_backend(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "interpreter": interpreting(),
        "kernel_dtypes": [str(d).replace("torch.", "") for d in KERNEL_DTYPES],
        "devices": {d: dict(zip(("path", "reason"), _device_choice(d))) for d in devices},
        "settings": settings.as_dict(),
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
