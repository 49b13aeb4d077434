"""ONNX export: while ``torch.onnx.export`` traces (either exporter), every op runs a
plain-torch formulation instead of its custom op, so the exported graph holds standard ONNX
operators (Gemm/MatMul, Add, Relu, ReduceSum, Sub, ...) that any ONNX runtime runs.

* :func:`exporting` says whether an ONNX exporter is tracing right now.
* linear_relu and centered export their torch path (``fastlayers.reference``): their entry
  points in ``fastlayers.ops`` take it on the kernel path too while :func:`exporting`.
* :func:`fixed_hidden`, :func:`halve_until`, :func:`fixed_hidden_mlp`: the export-time
  bodies of those functional forms (same arguments; the torch path of the halving loop
  reads counts on the host, which an exported graph cannot), built from
  :func:`halve_until_for_export`.
* :func:`halve_until_for_export`: the seed's ``while x.abs().sum() > t: x /= 2`` as ONE
  reduction and one multiplication, in exportable torch ops (no loop, no host read, so
  the exported count depends on the input instead of being baked in as a constant).
"""
import math
import struct
import sys
from typing import Tuple

import torch
from torch import Tensor

from ._validate import check_threshold

_FLAGS = "torch.onnx._internal.exporter._flags"  # dynamo=True (torch's default) exporter
_GLOBALS = ("torch.onnx._internal.torchscript_exporter._globals",  # dynamo=False, torch>=2.9
            "torch.onnx._globals")  # dynamo=False, older torch
_tracing_state = torch._C._get_tracing_state  # not None while torch.jit traces
K_FOREVER = 2 ** 31 - 1  # the count for an input holding +-inf (the seed's loop never ends)


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces a model, with ``dynamo=True`` (the exporter
    sets ``_flags._is_onnx_exporting`` around its whole run, torch.export included) or
    ``dynamo=False`` (TorchScript tracer: ``GLOBALS.in_onnx_export``). This is what
    ``torch.onnx.is_in_onnx_export()`` answers, read without importing torch.onnx (an
    exporter that is running has imported its module); on the 2-core dev CPU a call took
    0.23-0.29x the time of ``torch.onnx.is_in_onnx_export()`` (three runs, same process).
    Under Dynamo (torch.compile, and the dynamo exporter's strict capture strategy) only
    the first flag is read: Dynamo traces that module-global read (and guards on it), while
    torch's own function is folded to False and GLOBALS is an untraceable property; the
    TorchScript exporter never runs under Dynamo, and runs the model under
    ``torch.jit`` tracing, so in eager its flag is read only while a trace is recording
    (saves the flag's property read on every call outside a trace)."""
    if torch.compiler.is_compiling():  # (sys.modules.get would guard on len(sys.modules))
        try:
            from torch.onnx._internal.exporter import _flags
        except ImportError:  # an older torch
            return False
        return bool(_flags._is_onnx_exporting)
    flags = sys.modules.get(_FLAGS)
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return True
    if _tracing_state() is None:  # the TorchScript exporter runs the model under jit tracing
        return False
    for name in _GLOBALS:
        module = sys.modules.get(name)
        if module is not None:
            return bool(module.GLOBALS.in_onnx_export)
    return False


def _threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """The threshold as ``tensor > threshold`` sees it: rounded to ``dtype`` (through fp32
    for 16-bit dtypes, as torch converts a Python scalar). Python arithmetic only, so the
    TorchScript tracer records no tensor-to-float conversion."""
    v = float(threshold)
    if dtype == torch.float64 or not math.isfinite(v):
        return v
    try:
        v = struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)
    if dtype == torch.bfloat16:  # round the fp32 bits to the top 16, ties to even
        b = struct.unpack("<I", struct.pack("<f", v))[0]
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        v = struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]
    elif dtype == torch.float16:
        v = struct.unpack("<e", struct.pack("<e", v))[0] if abs(v) < 65520.0 else \
            math.copysign(math.inf, v)
    return v


def _halvings(s: Tensor, t: float) -> Tensor:
    """min{j integer : s * 2**-j <= t} for positive finite float64 s (0-dim) and t, exact:
    a log2 estimate, then one correction each way with exact power-of-two products."""
    j = torch.ceil(torch.log2(s) - math.log2(t))
    j = j + (s * torch.pow(2.0, -j) > t).to(s.dtype)
    return j - (s * torch.pow(2.0, 1.0 - j) <= t).to(s.dtype)


def halve_until_for_export(x: Tensor, threshold: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(y, k): the seed's ``while x.abs().sum() > threshold: x /= 2`` without a loop.

    Rule (t = threshold rounded to x's dtype; s0 = ``x.abs().sum()`` in x's dtype, the very
    sum the loop's first comparison sees): halving is exact, so the loop's j-th sum is
    s0 * 2**-j and k = min{j >= 0 : s0 * 2**-j <= t}, computed in float64 by
    :func:`_halvings`; y = x * 2**-k (one rounding to x's dtype). Edge cases:

    * s0 NaN (NaN in x): the loop stops at once: k = 0, y = x.
    * s0 = inf with every element finite (the fp32 sum overflowed): k from the sum of
      ``|x| * 2**-64`` plus 64, as the loop's sums come back in range after halving.
    * +-inf in x (the loop never ends): k = 2**31 - 1 and y the loop's limit: finite
      elements become signed zeros, +-inf stays.
    * Results that are subnormal: the loop rounds at each halving, this rounds once, so
      such elements can differ in the last bit; elements whose sum only reaches the
      threshold through such rounding can change k (the op's fp16 rule handles this;
      export refuses fp16, see :func:`halve_until`).

    Bitwise equal to the loop whenever both see the same s0 and no result is subnormal:
    in torch (same reduction) always; in an ONNX runtime its ReduceSum may add in another
    order, so a sum within rounding of t * 2**j can give a count one off. k: int64 0-dim.
    Two ReduceSum nodes appear in the graph (the second only decides the overflow case).
    """
    t = _threshold_in(x.dtype, threshold)
    a = x.abs()
    # shape [1], not 0-dim: the TorchScript exporter demotes 0-dim float64 math to float32
    s0 = a.sum().double().reshape(1)
    s1 = (a * 2.0 ** -64).sum().double().reshape(1)
    finite0, finite1 = torch.isfinite(s0), torch.isfinite(s1)
    one = torch.ones(1, dtype=torch.float64, device=x.device)
    k_sum = _halvings(torch.where(finite0, s0, one), t)
    k_big = torch.clamp(_halvings(torch.where(finite1, s1, one), t) + 64.0, min=0.0)
    forever = torch.full((1,), K_FOREVER, dtype=torch.float64, device=x.device)
    k = torch.where(finite0, k_sum, torch.where(finite1, k_big, forever))
    k = torch.where(s0 > t, k, torch.zeros_like(k))  # also k = 0 for a NaN sum
    # 2**-k as a product of two float64 powers (each >= 2**-1022, so exact; 0 for K_FOREVER)
    k1 = torch.clamp(k, max=1022.0)
    scale = torch.pow(2.0, -k1) * torch.pow(2.0, -torch.clamp(k - k1, max=1022.0))
    y = (x.double() * scale).to(x.dtype)
    y = torch.where(torch.isinf(x), x, y)
    return y, k.to(torch.int64).clamp(max=K_FOREVER).reshape(())


# ------------------------------------------------ export-time bodies of fastlayers.functional
def _refuse_fp16(opname: str, x: Tensor) -> None:
    if x.dtype == torch.float16:
        raise NotImplementedError(
            f"fastlayers.{opname}: ONNX export of the halving loop supports float32, float64 "
            f"and bfloat16, not float16: fp16 elements go subnormal and round at every "
            f"halving, so the loop's count is not a function of one reduction (the op uses "
            f"a histogram rule no standard ONNX graph reproduces). Export in float32 and "
            f"cast the ONNX model's input, or keep this block outside the exported graph.")


def fixed_hidden(x: Tensor, weight: Tensor, c: float = 1.0) -> Tensor:
    """relu(x @ weight + c): MatMul + Add + Relu."""
    return torch.relu(torch.matmul(x, weight) + float(c))


def halve_until(x: Tensor, threshold: float = 1.0, return_count: bool = False):
    """:func:`halve_until_for_export` with the functional form's return convention
    (k as int32, like the op)."""
    _refuse_fp16("halve_until", x)
    check_threshold("halve_until", x.dtype, threshold)
    y, k = halve_until_for_export(x, threshold)
    return (y, k.to(torch.int32)) if return_count else y


def fixed_hidden_mlp(x: Tensor, weight: Tensor, bias: Tensor, rand_weight: Tensor,
                     c: float = 1.0, threshold: float = 1.0, reduce=None,
                     return_count: bool = False):
    """The seed's FixedHiddenMLP forward: Gemm + MatMul/Add/Relu + Gemm, then the halving
    count from one reduction (:func:`halve_until_for_export`), then the optional sum."""
    if reduce not in (None, "sum"):
        raise ValueError(f"fixed_hidden_mlp: reduce must be None or 'sum', got {reduce!r}")
    _refuse_fp16("fixed_hidden_mlp", x)
    check_threshold("fixed_hidden_mlp", x.dtype, threshold)
    h1 = torch.nn.functional.linear(x, weight, bias)
    y = torch.nn.functional.linear(fixed_hidden(h1, rand_weight, c), weight, bias)
    y, k = halve_until_for_export(y, threshold)
    out = y.sum() if reduce == "sum" else y
    return (out, k.to(torch.int32)) if return_count else out
