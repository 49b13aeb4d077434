"""The seed's GPU helpers: :func:`try_gpu`, :func:`try_all_gpus`, and :func:`to_device` for
tensors, modules and nested containers.

Every fastlayers layer keeps its state in registered parameters and buffers, so
``layer.to(device)`` (or :func:`to_device`) moves all of it; feeding a layer an input on
another device raises an error naming both devices instead of computing anything.
"""
from collections.abc import Mapping, MutableMapping
import copy
import operator
from typing import Any, List, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

DeviceLike = Union[torch.device, str, int]

__all__ = ["cpu", "gpu", "num_gpus", "try_gpu", "try_all_gpus", "to_device"]


def cpu() -> torch.device:
    """``torch.device('cpu')``."""
    return torch.device("cpu")


def gpu(i: int = 0) -> torch.device:
    """``torch.device(f'cuda:{i}')`` (whether or not it exists; see :func:`try_gpu`)."""
    return torch.device(f"cuda:{i}")


def num_gpus() -> int:
    """How many CUDA devices torch can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def try_gpu(i: int = 0) -> torch.device:
    """``cuda:i`` if that GPU exists, else the CPU. i: an integer >= 0 (a Python, NumPy or
    0-d tensor integer, as the seed's ``device_count() >= i + 1`` takes)."""
    try:
        index = None if isinstance(i, bool) else operator.index(i)
    except TypeError:
        index = None
    if index is None or index < 0:
        raise ValueError(f"try_gpu: i must be a GPU index >= 0, got {i!r}")
    i = index
    return gpu(i) if num_gpus() >= i + 1 else cpu()


def try_all_gpus() -> List[torch.device]:
    """Every CUDA device (``[cuda:0, cuda:1, ...]``), or ``[cpu]`` when there is none."""
    return [gpu(i) for i in range(num_gpus())] or [cpu()]


def to_device(obj: Any, device: DeviceLike, non_blocking: bool = False) -> Any:
    """Move ``obj`` to ``device`` and return it.

    obj: a tensor (returns ``obj.to(device)``, a new tensor unless already there); an
        ``nn.Module`` (moved in place with ``.to``, parameters and buffers, and returned,
        as torch does); a ``PackedSequence``; or a list, tuple, namedtuple or dict (any
        mutable Mapping: OrderedDict, defaultdict, ...) of those, nested to any depth,
        rebuilt with the same type (read-only mappings come back as a dict). Anything
        else (numbers, strings, None, ...) is returned unchanged.
    device: a ``torch.device``, a string like ``'cuda:0'``, or a CUDA index.
    non_blocking: passed to ``Tensor.to`` (asynchronous host<->GPU copies from pinned memory).
    """
    device = torch.device(device)
    return _move(obj, device, non_blocking)


def _move(obj, device, non_blocking):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, nn.Module):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, PackedSequence):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device, non_blocking) for v in obj)
    if isinstance(obj, Mapping):
        moved = {key: _move(value, device, non_blocking) for key, value in obj.items()}
        if not isinstance(obj, MutableMapping):
            return moved  # read-only views (MappingProxyType, ...) come back as a dict
        out = copy.copy(obj)  # keeps the type and extras such as a defaultdict's factory
        out.update(moved)
        return out
    return obj
