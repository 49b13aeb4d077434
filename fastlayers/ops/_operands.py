"""Operand checks of the registered ops (``torch.ops.fastlayers.*``). fastlayers' own calls
reach the ops' implementations through :func:`fastlayers.functional`'s checks and run them
directly; a direct call of a registered op runs :func:`checked`'s wrapper, which checks the
operands first, on both paths alike. So a mismatch never reaches a kernel as a read past
the end of a tensor, and the torch path and the kernels refuse the same calls."""
import functools

FP32_MODES = ("ieee", "tf32")


def expect(op: str, fp32_mode=None, **operands) -> None:
    """Raise unless the operands fit together. operands: name=(tensor or None, dims), dims a
    string of one letter per dim; a letter names one size wherever it appears ("MK" and
    "NK": equal second dims). Every tensor: one floating dtype, one device.
    fp32_mode: when given, 'ieee' or 'tf32'."""
    sizes, first = {}, None
    for name, (t, dims) in operands.items():
        if t is None:
            continue
        if t.dim() != len(dims) or any(sizes.setdefault(d, n) != n for d, n in zip(dims, t.shape)):
            shapes = ", ".join(f"{n} {list(v.shape)}" for n, (v, _) in operands.items()
                               if v is not None)
            want = ", ".join(f"{n} [{', '.join(d)}]" for n, (_, d) in operands.items())
            raise ValueError(f"{op}: operands must be {want}; got {shapes}")
        if first is None:
            first = (name, t)
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        elif t.dtype != first[1].dtype:
            raise TypeError(f"{op}: {name} is {t.dtype}, {first[0]} is {first[1].dtype}: "
                            f"one dtype for all operands")
        elif t.device != first[1].device:
            raise RuntimeError(f"{op}: {name} is on {t.device}, {first[0]} on "
                               f"{first[1].device}: one device for all operands")
    if fp32_mode is not None and fp32_mode not in FP32_MODES:
        raise ValueError(f"{op}: fp32_mode must be one of {FP32_MODES}, got {fp32_mode!r}")


def checked(impl, check):
    """The function to register as ``impl``'s op: ``check(*args)``, then ``impl(*args)``.
    It carries impl's signature (torch infers the op's schema from it)."""
    @functools.wraps(impl)
    def op_impl(*args):
        check(*args)
        return impl(*args)
    return op_impl
