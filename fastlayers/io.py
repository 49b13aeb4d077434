"""Safe saving and loading of tensors and state_dicts (the seed's File I/O section).

    fastlayers.io.save(x, "x-file")                     # a tensor
    fastlayers.io.save([x, y], "x-files")                # a list (tuple, dict) of tensors
    fastlayers.io.save(net.state_dict(), "mlp.params")   # a state_dict
    fastlayers.io.save(net.state_dict(), "mlp.safetensors")
    x2 = fastlayers.io.load("x-file")
    fastlayers.io.save_model(net, "mlp.pth"); fastlayers.io.load_model(clone, "mlp.pth")

Format: paths ending in ``.safetensors`` use the safetensors library; every other path
torch's zip format (``torch.save``), readable by plain ``torch.load`` too.

Saving is atomic (see :mod:`fastlayers._atomic_write`): an exception or a kill during a
save leaves the previous file intact. :func:`save` accepts only what :func:`load` can read
back safely (tensors, numbers, strings, dtypes, devices, sizes, and lists, tuples, dicts and
sets of those) and names the offending entry otherwise (save a module's ``state_dict()``,
not the module).

Loading never runs code from the file: torch files load with ``weights_only=True``, and a
file holding other pickled objects raises :class:`UnsafeFileError`. With ``verify=True``
(default) the CRC-32 checksums a torch zip file carries for each record are checked first
(one extra read of the file), so a truncated or corrupted file raises
:class:`CorruptFileError` naming the file instead of loading damaged numbers; the same
holds for the per-tensor CRC-32s that :func:`save` stores in a safetensors file's metadata.
(Files in torch's pre-1.6 legacy format, and safetensors files written by other tools,
carry no checksums: truncation and damaged headers are still caught, flipped data bits
cannot be.)
"""
import json
import os
import pickle
import re
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._atomic_write import atomic_write

__all__ = ["save", "load", "save_model", "load_model", "LoadReport", "CorruptFileError",
           "UnsafeFileError", "StateDictMismatchError"]

_META_KEY = "fastlayers"  # safetensors metadata: {"container", "keys", "crc32"} as JSON


class CorruptFileError(ValueError):
    """The file is truncated, corrupted, or not a torch/safetensors file at all."""


class UnsafeFileError(pickle.UnpicklingError):
    """The file holds pickled Python objects that could run code when loaded."""


class StateDictMismatchError(RuntimeError):
    """A saved state_dict does not fit the model (missing, unexpected or mis-shaped keys)."""


# ----------------------------------------------------------------------------- save
_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size)
_CONTAINERS = (list, tuple, dict, OrderedDict, set)


def _is_safetensors(path) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _check_savable(obj, where: str = "obj") -> None:
    """Raise TypeError naming the first entry that weights_only loading would refuse."""
    if isinstance(obj, torch.Tensor):
        if is_lazy(obj):
            raise TypeError(f"fastlayers.io.save: {where} is an uninitialised lazy parameter; "
                            f"run one forward pass first so its shape is known")
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"fastlayers.io.save: {where} is a tensor subclass "
                            f"({type(obj).__name__}); save a plain tensor (t.as_subclass(torch.Tensor))")
        return
    if type(obj) in _LEAVES:
        return
    if type(obj) in _CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict):
                _check_savable(key, f"a key of {where}")
            _check_savable(value, f"{where}[{key!r}]" if not isinstance(obj, set) else
                           f"an element of {where}")
        return
    hint = (" Save its state_dict() instead (or use fastlayers.io.save_model)"
            if isinstance(obj, nn.Module) else "")
    raise TypeError(f"fastlayers.io.save: {where} is a {type(obj).__module__}."
                    f"{type(obj).__qualname__}, which cannot be loaded back without running "
                    f"pickled code; save tensors, numbers, strings and lists, tuples, dicts of "
                    f"those.{hint}")


def _crc32(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(memoryview(data.numpy()))


def _to_safetensors(obj) -> Tuple[dict, dict]:
    """(tensors by name, metadata) for a tensor, a list/tuple of tensors or a flat dict of
    tensors with string keys; anything else raises TypeError."""
    what = "fastlayers.io.save (.safetensors)"
    if isinstance(obj, torch.Tensor):
        container, named = "tensor", [("tensor", obj)]
    elif type(obj) in (list, tuple):
        container, named = type(obj).__name__, [(str(i), t) for i, t in enumerate(obj)]
    elif isinstance(obj, dict):
        container = "OrderedDict" if isinstance(obj, OrderedDict) else "dict"
        named = list(obj.items())
        for key, _ in named:
            if not isinstance(key, str):
                raise TypeError(f"{what}: keys must be strings, got {key!r}")
    else:
        raise TypeError(f"{what}: a safetensors file holds a tensor, a list/tuple of tensors or "
                        f"a flat dict of tensors, got {type(obj).__name__}; use a torch path "
                        f"(e.g. '.pt') for other objects")
    tensors, seen_storage = {}, set()
    for key, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: safetensors stores only tensors, but entry {key!r} is a "
                            f"{type(t).__name__}; use a torch path (e.g. '.pt') for nested or "
                            f"non-tensor content")
        _check_savable(t, f"entry {key!r}")
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # tied weights or views: safetensors wants one storage per tensor
        seen_storage.add(ptr)
        tensors[key] = t
    meta = {"container": container, "keys": [k for k, _ in named],
            "crc32": {k: _crc32(t) for k, t in tensors.items()}}
    return tensors, {_META_KEY: json.dumps(meta)}


def save(obj: Any, path) -> None:
    """Save ``obj`` to ``path`` atomically.

    obj: a tensor, a state_dict, or lists/tuples/dicts/sets of tensors and plain values
        (torch format); for ``.safetensors`` paths a tensor, a list/tuple of tensors or a
        flat dict of tensors with string keys (loaded back as the same container type).
    path: str or PathLike; its directory must exist. An existing file is replaced only
        once the new one is complete.
    Raises TypeError naming any entry that could not be loaded back safely.
    """
    if _is_safetensors(path):
        from safetensors.torch import save as st_save
        tensors, metadata = _to_safetensors(obj)
        atomic_write(path, lambda f: f.write(st_save(tensors, metadata)))
    else:
        _check_savable(obj)
        atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- load
def _corrupt(path, exc) -> CorruptFileError:
    return CorruptFileError(f"cannot load {os.fspath(path)}: the file is truncated, corrupted, or "
                            f"not a torch/safetensors file ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})")


def _verify_zip(path) -> None:
    if not zipfile.is_zipfile(path):
        return  # legacy format or damaged beyond recognition: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    if bad is not None:
        raise CorruptFileError(f"cannot load {os.fspath(path)}: record {bad!r} fails its CRC-32 "
                               f"check (the file is corrupted)")


def _load_torch(path, map_location, verify: bool):
    if verify:
        _verify_zip(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if culprit is None:
            raise _corrupt(path, exc) from exc
        raise UnsafeFileError(
            f"refusing to load {os.fspath(path)}: it holds pickled Python objects "
            f"({culprit.group(1)}) that could run arbitrary code when loaded. If you trust "
            f"the file, use torch.load(path, weights_only=False); fastlayers.io.save writes "
            f"only safe content") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _load_safetensors(path, map_location, verify: bool):
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError, or a header that is not valid JSON
        raise _corrupt(path, exc) from exc
    meta = json.loads(raw_meta) if raw_meta else {"container": "dict", "keys": list(tensors)}
    if verify:
        for key, crc in meta.get("crc32", {}).items():
            if key not in tensors or _crc32(tensors[key]) != crc:
                raise CorruptFileError(f"cannot load {os.fspath(path)}: tensor {key!r} fails "
                                       f"its CRC-32 check (the file is corrupted)")
    if map_location is not None:
        tensors = {k: t.to(map_location) for k, t in tensors.items()}
    ordered = [(k, tensors[k]) for k in meta["keys"]]
    container = meta["container"]
    if container == "tensor":
        return ordered[0][1]
    if container in ("list", "tuple"):
        values = [t for _, t in ordered]
        return values if container == "list" else tuple(values)
    return (OrderedDict if container == "OrderedDict" else dict)(ordered)


def load(path, map_location=None, *, verify: bool = True):
    """Load what :func:`save` (or ``torch.save`` / safetensors) wrote to ``path``.

    map_location: as in ``torch.load`` (a device, a string like ``'cpu'``, a dict or a
        callable) for torch files (default: the devices they were saved from); a device
        or string for ``.safetensors`` files (default: the CPU).
    verify: check the checksums first (one extra read); False skips it for large files
        you trust to be intact.
    Raises FileNotFoundError, :class:`UnsafeFileError` (the file would run code) or
    :class:`CorruptFileError` (truncated, corrupted or not a checkpoint), each naming
    the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot load {os.fspath(path)}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot load {os.fspath(path)}: it is a directory")
    if _is_safetensors(path):
        return _load_safetensors(path, map_location, verify)
    return _load_torch(path, map_location, verify)


# ----------------------------------------------------------------------------- models
@dataclass
class LoadReport:
    """What :func:`load_model` found comparing a saved state_dict with the model.

    missing_keys: in the model, not in the file. unexpected_keys: in the file, not in the
    model. mismatched: (key, shape in the file, shape in the model) for keys in both with
    different shapes (never loaded).
    """

    path: str
    model: str
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path} loaded into {self.model}: every key matched"
        lines = [f"{self.path} does not match {self.model}:"]
        if self.missing_keys:
            lines.append(f"  {len(self.missing_keys)} missing key(s) (in the model, not in the "
                         f"file): {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"  {len(self.unexpected_keys)} unexpected key(s) (in the file, not in "
                         f"the model): {', '.join(self.unexpected_keys)}")
        for key, saved, wanted in self.mismatched:
            lines.append(f"  shape mismatch for {key}: file has {list(saved)}, model has "
                         f"{list(wanted)}")
        prefix = "module."
        if self.unexpected_keys and all(k.startswith(prefix) for k in self.unexpected_keys):
            lines.append("  hint: the file's keys start with 'module.' (saved from a "
                         "DataParallel/DDP wrapper); save model.module.state_dict() instead")
        return "\n".join(lines)


def save_model(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` to ``path`` atomically (see :func:`save`)."""
    lazy = [k for k, t in model.state_dict().items() if is_lazy(t)]
    if lazy:
        raise ValueError(f"save_model: {type(model).__name__} has uninitialised lazy "
                         f"parameters ({', '.join(lazy)}); run one forward pass first")
    save(model.state_dict(), path)


def _model_device(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if not is_lazy(t):
            return t.device
    return torch.device("cpu")


def load_model(model: nn.Module, path, strict: bool = True, map_location=None, *,
               verify: bool = True) -> LoadReport:
    """Load the state_dict saved at ``path`` into ``model`` and report how the keys matched.

    strict: True (default) raises :class:`StateDictMismatchError` listing every missing,
        unexpected and mis-shaped key, and leaves ``model`` as it was (lazy layers the
        file materialised stay materialised); False loads
        every key that fits and returns the report of the rest.
    map_location: where tensors are loaded before copying (default: the model's device).
    Lazy modules are materialised from the file, as with ``load_state_dict``. Key checks
    are torch's own (load hooks, such as a module accepting a file without one of its
    buffers, are honoured).
    """
    name = type(model).__name__
    saved = load(path, _model_device(model) if map_location is None else map_location,
                 verify=verify)
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise StateDictMismatchError(f"{os.fspath(path)} does not hold a state_dict "
                                     f"(got {type(saved).__name__}), so it cannot load into {name}")
    report = LoadReport(os.fspath(path), name)
    own = model.state_dict()
    for key, t in saved.items():
        if key in own and not is_lazy(own[key]) and isinstance(t, torch.Tensor) \
                and t.shape != own[key].shape:
            report.mismatched.append((key, tuple(t.shape), tuple(own[key].shape)))
    mismatched = {m[0] for m in report.mismatched}
    fitting = OrderedDict((k, v) for k, v in saved.items() if k not in mismatched)
    if hasattr(saved, "_metadata"):
        fitting._metadata = saved._metadata
    backup = None
    if strict and (mismatched or set(fitting) != set(own)):  # torch decides (hooks); undo
        backup = {k: t.detach().clone() for k, t in own.items() if not is_lazy(t)}
    result = model.load_state_dict(fitting, strict=False)
    report.missing_keys = [k for k in result.missing_keys if k not in mismatched]
    report.unexpected_keys = list(result.unexpected_keys)
    if strict and not report.ok:
        if backup is not None:
            model.load_state_dict(backup, strict=False)
        raise StateDictMismatchError(str(report))
    return report
