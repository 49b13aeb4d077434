"""Input checks of the functional ops: clear errors naming shape, dtype or device.

Each public op has one ``check_<op>`` here; :mod:`fastlayers.functional` calls it first."""
import struct

import torch
from torch import Tensor

_any_autocast = torch._C._is_any_autocast_enabled


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or "
            f"float64), got dtype {t.dtype}"
        )


def plain(t: Tensor) -> bool:
    """Whether t is a plain tensor or Parameter: not a subclass (DTensor, an async
    collective's result, a fake tensor), whose memory is not simply its values."""
    return type(t) is Tensor or type(t) is torch.nn.Parameter


def check_not_dtensor(op: str, **tensors) -> None:
    """Refuse DTensors: the halving count is read off the bits of one global sum, and
    DTensor's sharded ops neither give that sum to a host read (one shard's) nor shift its
    bits right. (The plain path's check is one type test per tensor.)"""
    for name, t in tensors.items():
        if t is None or plain(t):
            continue
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor
            if isinstance(t, DTensor):
                raise NotImplementedError(
                    f"{op}: {name} is a DTensor, which the halving count does not support "
                    f"(it needs one global sum's bits); call it on {name}.full_tensor(), "
                    f"or on each rank's {name}.to_local() for a count per rank")


def check_matmul_operands(op: str, x: torch.Tensor, weight: torch.Tensor, in_dim: int,
                          layout: str) -> None:
    """x [..., in_features] against a 2-D float ``weight`` whose dim ``in_dim`` holds
    in_features; ``layout`` names the weight's dims in messages, e.g. "[out, in]"."""
    check_float(op, "input", x)
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D {layout}, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[in_dim]:
        raise ValueError(f"{op}: input has shape {tuple(x.shape)}, but weight "
                         f"{tuple(weight.shape)} expects in_features={weight.shape[in_dim]} "
                         f"in the last dim")


def check_same(op: str, named: dict) -> None:
    """All tensors in ``named`` (name -> tensor or None) share one device and one dtype."""
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"move them to one device (e.g. module.to({first.device!s}))"
            )
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                f"cast one of them (or use torch.autocast)"
            )


def autocast_dtype(device_type: str):
    """The autocast dtype in force for ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. 'meta')
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def autocast_cast(device_type: str, *tensors):
    """``tensors`` cast as torch.autocast casts an op of its lower-precision list (F.linear):
    floating tensors other than float64 go to the autocast dtype; float64, non-float
    tensors and None are left alone. Returns them unchanged when autocast is off."""
    cast = autocast_dtype(device_type)
    if cast is None:
        return tensors
    return tuple(t if t is None or t.dtype == torch.float64 or not t.is_floating_point()
                 else t.to(cast) for t in tensors)


def check_python_float(op: str, name: str, value) -> float:
    """``value`` as a float: ints and floats only (not bools, tensors or strings)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{op}: {name} is an int of {value.bit_length()} bits, beyond "
                         f"float's range") from None


def check_bias(op: str, bias, features: int) -> None:
    """``bias`` is None or a float tensor of shape [features]."""
    if bias is None:
        return
    check_float(op, "bias", bias)
    if bias.shape != (features,):
        raise ValueError(f"{op}: bias must have shape ({features},) to match weight, got "
                         f"{tuple(bias.shape)}")


def linear_relu_ok(x, weight, bias) -> bool:
    """The common case, with the fewest Python-to-C++ calls (host time: every call pays
    it): float tensors of one dtype on one device, weight [out, in], x [..., in], bias
    [out] or None, autocast off. Each tensor's dtype, shape and device is read once.
    False means "run :func:`prepare_linear_relu`" (which raises with a clear message, or
    casts under autocast and passes)."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return False
    dtype = x.dtype
    x_shape = x.shape
    w_shape = weight.shape
    if not (dtype.is_floating_point and weight.dtype is dtype and len(w_shape) == 2
            and x_shape and x_shape[-1] == w_shape[1]):
        return False
    if bias is not None:
        if not (isinstance(bias, Tensor) and bias.dtype is dtype):
            return False
        b_shape = bias.shape
        if len(b_shape) != 1 or b_shape[0] != w_shape[0]:
            return False
    if x.is_cpu:  # all on the CPU: no torch.device objects to build and compare
        if not (weight.is_cpu and (bias is None or bias.is_cpu)):
            return False
    else:
        device = x.device
        if weight.device != device or (bias is not None and bias.device != device):
            return False
    return not _any_autocast()


def check_linear_relu(x, weight, bias) -> None:
    """linear_relu: x [..., in], weight [out, in], bias [out] or None."""
    check_matmul_operands("linear_relu", x, weight, 1, "[out_features, in_features]")
    check_bias("linear_relu", bias, weight.shape[0])


def check_same_place(op: str, named: dict) -> None:
    """:func:`check_same` after a cheap test (dtypes by identity, devices by equality)."""
    items = [t for t in named.values() if t is not None]
    first = items[0]
    for t in items[1:]:
        if t.dtype is not first.dtype or t.device != first.device:
            check_same(op, named)


def prepare_linear_relu(x, weight, bias):
    """The slow path of :func:`fastlayers.functional.linear_relu`: every check with its
    message, then autocast, then one device and dtype. Returns (x, weight, bias)."""
    check_linear_relu(x, weight, bias)
    x, weight, bias = autocast_cast(x.device.type, x, weight, bias)
    check_same("linear_relu", {"input": x, "weight": weight, "bias": bias})
    return x, weight, bias


def check_fixed_hidden(x, weight, c) -> float:
    """fixed_hidden: x [..., in], a frozen weight [in, out], c a Python float."""
    op = "fixed_hidden"
    check_matmul_operands(op, x, weight, 0, "[in_features, out_features]")
    if weight.requires_grad:
        raise ValueError(f"{op}: the weight is frozen and gets no gradient, but it requires "
                         f"grad; pass weight.detach() (or use a Linear for a trainable weight)")
    return check_python_float(op, "c", c)


def check_fixed_hidden_mlp(x, weight, bias, rand_weight, c, reduce) -> float:
    """fixed_hidden_mlp: x [..., d], weight [d, d], bias [d] or None, rand_weight [d, d]
    (frozen), c a Python float, reduce None or 'sum'."""
    op = "fixed_hidden_mlp"
    for name, t in (("input", x), ("weight", weight), ("rand_weight", rand_weight)):
        check_float(op, name, t)
    if reduce not in (None, "sum"):
        raise ValueError(f"{op}: reduce must be None or 'sum', got {reduce!r}")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"{op}: weight must be square [d, d] (one Linear(d, d) is used "
                         f"twice), got shape {tuple(weight.shape)}")
    d = weight.shape[0]
    if rand_weight.shape != (d, d):
        raise ValueError(f"{op}: rand_weight must have shape ({d}, {d}) to match weight, "
                         f"got {tuple(rand_weight.shape)}")
    check_bias(op, bias, d)
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{op}: input has shape {tuple(x.shape)}, but the layer expects "
                         f"in_features={d} in the last dim")
    if rand_weight.requires_grad:
        raise ValueError(f"{op}: rand_weight is frozen (the seed creates it with "
                         f"requires_grad=False); pass rand_weight.detach()")
    return check_python_float(op, "c", c)


# ------------------------------------------------------------- the halving loop's threshold
def _smallest_threshold(dtype: torch.dtype) -> float:
    """The least Python float that rounds to at least dtype's smallest normal number (the
    count rule needs a normal threshold; rounded as torch's ``tensor > threshold`` rounds
    it, through fp32 for 16-bit dtypes): a bisection over float64 bit patterns."""
    tiny = torch.finfo(dtype).tiny
    lo, hi = 0, struct.unpack("<q", struct.pack("<d", tiny))[0]
    while hi - lo > 1:  # hi rounds to >= tiny, lo below
        mid = (lo + hi) // 2
        v = struct.unpack("<d", struct.pack("<q", mid))[0]
        lo, hi = (lo, mid) if float(torch.tensor(v, dtype=dtype)) >= tiny else (mid, hi)
    return struct.unpack("<d", struct.pack("<q", hi))[0]


SMALLEST_THRESHOLD = {d: _smallest_threshold(d) for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def check_threshold(op: str, dtype: torch.dtype, threshold) -> float:
    """The halving loop's threshold as a Python float; a clear error for values the loop
    cannot use. Compile-safe (``dynamic=True`` makes it a SymFloat): plain comparisons
    only, which dynamo turns into guards (``threshold != threshold`` is the NaN test)."""
    if isinstance(threshold, (torch.Tensor, bool)) or not isinstance(
            threshold, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: threshold must be a Python float (a tensor threshold "
                        f"would need a device-to-host sync), got {type(threshold).__name__}")
    try:
        threshold = threshold * 1.0  # int -> float (float() would specialize a SymFloat)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{op}: threshold is an int of {threshold.bit_length()} bits, "
                         f"beyond float's range") from None
    if threshold != threshold or threshold <= 0:
        raise ValueError(f"{op}: threshold must be > 0, got {threshold} (the seed's loop "
                         f"`while x.abs().sum() > threshold` never starts for NaN; for 0 or "
                         f"less it runs until every element is 0, or forever)")
    if threshold < SMALLEST_THRESHOLD[dtype]:
        tiny = torch.finfo(dtype).tiny
        raise ValueError(
            f"{op}: threshold {threshold} rounds below the smallest normal number "
            f"{tiny} of {dtype}; sums that small do not halve exactly, so the loop count is "
            f"not defined by one reduction. Use a threshold >= {tiny}")
    return threshold
