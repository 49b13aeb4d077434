"""Facts about how Triton will run here, shared by every launcher."""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def _interpret_switch() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Read once, when this package is imported: @triton.jit chooses the interpreter when the
# kernels are defined, so a TRITON_INTERPRET set later does not apply to them.
_INTERPRETING = _interpret_switch()


INTERPRETED = tl.constexpr(_INTERPRETING)  # in a kernel: a branch only the interpreter takes


@triton.jit
def round_bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 value (ties to even), kept in fp32: its low
    16 bits are 0 (NaN stays as it is)."""
    b = v.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """fp32 ``v`` converted to ``dtype`` rounded to nearest even, as the GPU converts.
    Triton's CPU interpreter truncates fp32 -> bf16 (and flushes bf16 subnormals), so there
    :func:`round_bf16`'s upper 16 bits are stored as the bf16 value (a NaN as 0x7FC0)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = round_bf16(v).to(tl.int32, bitcast=True) >> 16
            return tl.where(v != v, 0x7FC0, bits).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


def interpreting() -> bool:
    """True when this package's kernels run in Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` when they were defined)."""
    return _INTERPRETING


# Switches handed over by fastlayers.settings (parsed once from FASTLAYERS_AUTOTUNE /
# FASTLAYERS_TMA); this package never reads the environment on a launch.
_SWITCHES = {"autotune": False, "tma": False}


def configure(*, autotune: bool, tma: bool) -> None:
    """Set the launch switches: ``autotune`` (search the config lists per shape, a pause
    of seconds on each new shape, instead of the built-in heuristics) and ``tma`` (GEMMs on a
    GPU take the persistent TMA kernel where the operands allow, kernels/gemm_tma.py)."""
    _SWITCHES["autotune"], _SWITCHES["tma"] = bool(autotune), bool(tma)


def autotuning() -> bool:
    """True when launchers search their config lists (``FASTLAYERS_AUTOTUNE``)."""
    return _SWITCHES["autotune"]


def tma_enabled() -> bool:
    """True when GEMMs may take the persistent TMA kernel (``FASTLAYERS_TMA``)."""
    return _SWITCHES["tma"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints: ``triton.cdiv``'s value without its host cost (a
    ``constexpr_function`` call: ~4 us each with triton 3.9 on the dev CPU; launchers need
    several per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (0 for 0): ``triton.next_power_of_2`` for Python ints,
    without its host cost (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Number of streaming multiprocessors of a CUDA device (1 under the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype, fp32_mode: str) -> str:
    """The ``tl.dot`` input precision for operands of ``dtype``.

    fp32_mode: ``"ieee"`` (fp32-accurate: computed as 3xTF32 on tensor cores) or
    ``"tf32"`` (one TF32 product, ~1e-3 relative error). 16-bit operands always multiply
    exactly on tensor cores with fp32 accumulation, so the mode does not apply to them.
    """
    if dtype != torch.float32:
        return "tf32"
    if fp32_mode == "ieee":
        return "tf32x3"
    if fp32_mode == "tf32":
        return "tf32"
    raise ValueError(f"fp32 matmul mode must be 'ieee' or 'tf32', got {fp32_mode!r}")


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current one)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
