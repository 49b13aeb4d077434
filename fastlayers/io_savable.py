"""What :func:`fastlayers.io.save` accepts: only what a weights-only load reads back.

:func:`check_savable` walks an object and raises TypeError naming the first entry that
``torch.load(weights_only=True)`` would refuse (a module, a function, a namedtuple, a
tensor subclass, an uninitialised lazy parameter).
"""
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.parameter import is_lazy

_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size)
_CONTAINERS = (list, tuple, dict, OrderedDict, set)


def check_savable(obj, where: str = "obj", _seen=None) -> None:
    """Raise TypeError naming the first entry of ``obj`` that weights_only loading would
    refuse, or that torch.save cannot store (two views of one memory as different dtypes).
    where: how the message names ``obj`` (entries are named from it). A container that
    holds itself is walked once (pickle keeps such references, as torch.save does)."""
    if isinstance(obj, torch.Tensor):
        if is_lazy(obj):
            raise TypeError(f"fastlayers.io.save: {where} is an uninitialised lazy parameter; "
                            f"run one forward pass first so its shape is known")
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"fastlayers.io.save: {where} is a tensor subclass "
                            f"({type(obj).__name__}); save a plain tensor (t.as_subclass(torch.Tensor))")
        if obj.layout == torch.strided and not (obj.is_quantized or obj.is_nested) \
                and obj.untyped_storage().nbytes() % obj.element_size():
            raise TypeError(f"fastlayers.io.save: {where} is a {obj.dtype} view of a storage "
                            f"of {obj.untyped_storage().nbytes()} bytes, not a whole number of "
                            f"its {obj.element_size()}-byte elements, which torch.load cannot "
                            f"read back; save a copy of it (.clone())")
        if _seen is not None and obj.layout == torch.strided and not obj.is_meta \
                and obj.untyped_storage().nbytes():
            dtype, first = _seen.setdefault(("storage", obj.untyped_storage().data_ptr()),
                                            (obj.dtype, where))
            if dtype != obj.dtype:
                raise TypeError(f"fastlayers.io.save: {where} ({obj.dtype}) and {first} "
                                f"({dtype}) view the same memory as different dtypes, which "
                                f"torch.save cannot store; save a copy of one (.clone())")
        return
    if type(obj) in _LEAVES:
        return
    if type(obj) in _CONTAINERS:
        _seen = {} if _seen is None else _seen  # containers walked; storages' first dtype
        if ("container", id(obj)) in _seen:
            return
        _seen[("container", id(obj))] = True
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict):
                check_savable(key, f"a key of {where}", _seen)
            check_savable(value, f"{where}[{key!r}]" if not isinstance(obj, set) else
                          f"an element of {where}", _seen)
        return
    hint = (" Save its state_dict() instead (or use fastlayers.io.save_model)"
            if isinstance(obj, nn.Module) else "")
    raise TypeError(f"fastlayers.io.save: {where} is a {type(obj).__module__}."
                    f"{type(obj).__qualname__}, which cannot be loaded back without running "
                    f"pickled code; save tensors, numbers, strings and lists, tuples, dicts of "
                    f"those.{hint}")
