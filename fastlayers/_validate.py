"""Input checks shared by the functional ops: clear errors naming shape, dtype or device."""
import torch


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or "
            f"float64), got dtype {t.dtype}"
        )


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
