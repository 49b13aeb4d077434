"""``.safetensors`` files for :mod:`fastlayers.io`: what a tensor/list/dict becomes, and
how it is loaded and checked.

A safetensors file holds named tensors and a string-to-string metadata map. fastlayers
stores, under the metadata key ``"fastlayers"``, JSON with

* ``container``: ``"tensor"``, ``"list"``, ``"tuple"``, ``"dict"`` or ``"OrderedDict"``;
* ``keys``: the tensor names in container order (``"0"``, ``"1"``, ... for lists/tuples);
* ``crc32``: the CRC-32 of each tensor's bytes;
* ``layout`` (since format 2): each tensor's dtype and shape;
* ``meta_crc32`` (since format 2): the CRC-32 of the canonical JSON of the entries above,
  so an edited or damaged metadata entry is detected, not obeyed.

Loading validates all of it before use: the metadata must list exactly the tensors the
file holds (a tensor listed but missing, or present but not listed, raises
:class:`~fastlayers.io_errors.CorruptFileError`), and with ``verify`` every tensor's bytes
must match its CRC-32. Files from other tools (no fastlayers metadata) load as a dict.
"""
import ctypes
import json
import os
import zlib
from collections import OrderedDict
from typing import Tuple

import torch

from .io_errors import (CorruptFileError, DeviceUnavailableError, UnsupportedTensorError,
                        corrupt, os_failure)
from .io_savable import check_savable

META_KEY = "fastlayers"
_CONTAINERS = ("tensor", "list", "tuple", "dict", "OrderedDict")
_WHAT = "fastlayers.io.save (.safetensors)"


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of the bytes of ``t`` (C order, native byte order)."""
    data = t.detach().cpu().contiguous()
    if data.nbytes == 0:
        return zlib.crc32(b"")
    buffer = (ctypes.c_char * data.nbytes).from_address(data.data_ptr())
    return zlib.crc32(memoryview(buffer))


def _canonical(meta: dict) -> bytes:
    body = {k: meta[k] for k in ("container", "keys", "crc32", "layout") if k in meta}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _supported_dtypes():
    from safetensors.torch import _TYPES
    return set(_TYPES.values())


def _check_tensor(key, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_WHAT}: safetensors stores only tensors, but entry {key!r} is a "
                        f"{type(t).__name__}; use a torch path (e.g. '.pt') for nested or "
                        f"non-tensor content")
    check_savable(t, f"entry {key!r}")
    problem = None
    if t.is_quantized:
        problem = f"a quantized tensor ({t.dtype})"
    elif t.layout != torch.strided or t.is_nested:
        problem = f"a {'nested' if t.is_nested else str(t.layout)} tensor"
    elif t.dtype not in _supported_dtypes():
        problem = f"a {t.dtype} tensor, a dtype safetensors has no code for"
    elif t.device.type == "meta":
        problem = "a meta tensor (it has no data)"
    if problem:
        raise UnsupportedTensorError(f"{_WHAT}: entry {key!r} is {problem}; save it to a torch "
                                     f"path (e.g. '.pt') instead")


def to_safetensors(obj) -> Tuple[dict, dict]:
    """(tensors by name, metadata) for a tensor, a list/tuple of tensors or a flat dict of
    tensors with string keys; anything else raises TypeError (UnsupportedTensorError for
    tensors the format cannot hold). Views and tensors sharing storage are copied, so each
    tensor's own elements, and nothing more, are written."""
    if isinstance(obj, torch.Tensor):
        container, named = "tensor", [("tensor", obj)]
    elif type(obj) in (list, tuple):
        container, named = type(obj).__name__, [(str(i), t) for i, t in enumerate(obj)]
    elif isinstance(obj, dict):
        container = "OrderedDict" if isinstance(obj, OrderedDict) else "dict"
        named = list(obj.items())
        for key, _ in named:
            if not isinstance(key, str):
                raise TypeError(f"{_WHAT}: keys must be strings, got {key!r}")
            if key == "__metadata__":  # the file could be written but never read back
                raise TypeError(f"{_WHAT}: the key '__metadata__' is the safetensors "
                                f"header's own; rename the entry or use a torch path "
                                f"(e.g. '.pt')")
    else:
        raise TypeError(f"{_WHAT}: a safetensors file holds a tensor, a list/tuple of tensors or "
                        f"a flat dict of tensors, got {type(obj).__name__}; use a torch path "
                        f"(e.g. '.pt') for other objects")
    tensors, seen_storage = {}, set()
    for key, t in named:
        _check_tensor(key, t)
        # the values, not the memory: a conjugate or negative view holds its elements
        # un-negated, with a flag the format has no place for
        t = t.detach().resolve_conj().resolve_neg().contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen_storage or storage.nbytes() != t.nbytes or t.storage_offset() != 0:
            t = t.clone()  # a view or a shared storage: write this tensor's elements only
        seen_storage.add(ptr)
        tensors[key] = t
    meta = {"format": 2, "container": container, "keys": [k for k, _ in named],
            "crc32": {k: crc32(t) for k, t in tensors.items()},
            "layout": {k: [str(t.dtype).removeprefix("torch."), list(t.shape)]
                       for k, t in tensors.items()}}
    meta["meta_crc32"] = zlib.crc32(_canonical(meta))
    return tensors, {META_KEY: json.dumps(meta)}


def _looks_like_ours(value: str) -> bool:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and "container" in parsed and "crc32" in parsed


def _validated_meta(path, raw_meta, names) -> dict:
    """The parsed fastlayers metadata, checked against the tensor names in the file."""
    def bad(cause):
        return CorruptFileError(f"cannot load {os.fspath(path)}: its fastlayers metadata "
                                f"{cause} (the file is corrupted or was edited)")
    try:
        meta = json.loads(raw_meta)
    except (ValueError, RecursionError) as exc:
        raise bad("is not valid JSON") from exc
    if not isinstance(meta, dict):
        raise bad(f"is a JSON {type(meta).__name__}, not an object")
    if "format" in meta and ("meta_crc32" not in meta or "layout" not in meta):
        raise bad("lacks its CRC-32 or layout entries")
    if "meta_crc32" in meta and meta["meta_crc32"] != zlib.crc32(_canonical(meta)):
        raise bad("fails its CRC-32 check")
    container, keys, crcs = meta.get("container"), meta.get("keys"), meta.get("crc32")
    if container not in _CONTAINERS:
        raise bad(f"names an unknown container {container!r}")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
            or len(set(keys)) != len(keys):
        raise bad("has no list of distinct tensor names")
    if not isinstance(crcs, dict) or not all(type(v) is int and 0 <= v < 2 ** 32
                                             for v in crcs.values()):
        raise bad("has no valid table of CRC-32s")
    for listed in sorted(set(keys) | set(crcs)):
        if listed not in names:
            raise bad(f"lists tensor {listed!r}, which the file does not hold")
    for held in sorted(names):
        if held not in keys or held not in crcs:
            raise bad(f"does not list tensor {held!r}, which the file holds")
    expected = (["tensor"] if container == "tensor" else [str(i) for i in range(len(keys))]
                if container in ("list", "tuple") else None)
    if expected is not None and keys != expected:
        raise bad(f"gives names {keys[:5]} for a {container}, expected {expected[:5]}")
    layout = meta.get("layout")
    if layout is not None and (
            not isinstance(layout, dict) or set(layout) != set(keys)
            or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                       and isinstance(v[1], list) and all(type(d) is int for d in v[1])
                       for v in layout.values())):
        raise bad("has a layout table that does not give exactly its tensors' dtypes and shapes")
    return meta


def _move(path, tensors: dict, map_location) -> dict:
    if map_location is None:
        return tensors
    if not isinstance(map_location, (str, int, torch.device)):
        raise TypeError(f"fastlayers.io.load: map_location for a .safetensors file must be a "
                        f"device or a string like 'cpu', got {type(map_location).__name__}")
    try:
        return {k: t.to(map_location) for k, t in tensors.items()}
    except (RuntimeError, AssertionError) as exc:
        raise DeviceUnavailableError(f"cannot load {os.fspath(path)} to {map_location!r}: "
                                     f"{str(exc).strip().splitlines()[0]}; pass "
                                     f"map_location='cpu' (or a device this machine has)") from exc


def load_safetensors(path, map_location, verify: bool):
    """What :func:`to_safetensors` described, read back from ``path`` and checked (see the
    module docstring); the container type is the one saved."""
    from safetensors.torch import load as load_bytes
    try:  # ONE read of one open file: header and tensors from the same bytes (safe_open's
        # get_tensor may reopen the path, which a concurrent atomic save can replace between)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise os_failure(path, exc) from exc
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError(f"header length {n} does not fit in {len(data)} bytes")
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = load_bytes(data)
    except Exception as exc:  # SafetensorError, a header that is not valid JSON, ...
        raise corrupt(path, exc) from exc
    raw_meta = metadata.get(META_KEY)
    if raw_meta is None:
        renamed = [k for k, v in metadata.items() if _looks_like_ours(v)]
        if renamed:
            raise CorruptFileError(f"cannot load {os.fspath(path)}: fastlayers metadata found "
                                   f"under the key {renamed[0]!r} instead of {META_KEY!r} (the "
                                   f"file is corrupted or was edited)")
        return dict(_move(path, tensors, map_location))  # another tool's file: a dict
    meta = _validated_meta(path, raw_meta, set(tensors))
    for key, (dtype, shape) in (meta.get("layout") or {}).items():
        t = tensors[key]
        if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != shape:
            raise CorruptFileError(f"cannot load {os.fspath(path)}: tensor {key!r} is "
                                   f"{t.dtype} {list(t.shape)} in the file but was saved as "
                                   f"{dtype} {shape} (the file is corrupted or was edited)")
    if verify:
        for key in meta["keys"]:
            if crc32(tensors[key]) != meta["crc32"][key]:
                raise CorruptFileError(f"cannot load {os.fspath(path)}: tensor {key!r} fails "
                                       f"its CRC-32 check (the file is corrupted)")
    tensors = _move(path, tensors, map_location)
    ordered = [(k, tensors[k]) for k in meta["keys"]]
    container = meta["container"]
    if container == "tensor":
        return ordered[0][1]
    if container in ("list", "tuple"):
        values = [t for _, t in ordered]
        return values if container == "list" else tuple(values)
    return (OrderedDict if container == "OrderedDict" else dict)(ordered)
