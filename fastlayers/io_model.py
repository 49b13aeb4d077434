"""``save_model`` / ``load_model``: a module's state_dict to a file and back, all or nothing.

:func:`load_model` first checks every key of the file against the model (a tensor where
the model has one, the same shape, a dtype of the same kind), then loads; a load that fails
for any reason (a check above, a missing or unexpected key in strict mode, an exception from
torch or a module's load hook) puts every tensor it may have written back, bit for bit.
"""
import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .io_errors import StateDictMismatchError


@dataclass
class LoadReport:
    """What :func:`load_model` found comparing a saved state_dict with the model.

    missing_keys: in the model, not in the file. unexpected_keys: in the file, not in the
    model. mismatched: (key, shape in the file, shape in the model) for keys in both with
    different shapes (never loaded). wrong_type: (key, what the file has, what the model
    has) for keys in both where the file holds a non-tensor, or a tensor of another dtype
    kind (bool, integer, floating, complex; never loaded).
    """

    path: str
    model: str
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    wrong_type: List[Tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched
                    or self.wrong_type)

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
        for key, saved, wanted in self.wrong_type:
            lines.append(f"  type mismatch for {key}: file has {saved}, model has {wanted}")
        prefix = "module."
        if self.unexpected_keys and all(k.startswith(prefix) for k in self.unexpected_keys):
            lines.append("  hint: the file's keys start with 'module.' (saved from a "
                         "DataParallel/DDP wrapper); save model.module.state_dict() instead")
        return "\n".join(lines)


def save_model(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` to ``path`` atomically (see :func:`fastlayers.io.save`)."""
    from .io import save
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


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _check_keys(saved: dict, own: dict, report: LoadReport) -> set:
    """Fill report.mismatched / wrong_type for the keys of ``saved`` the model also has;
    return those keys (they are not loaded)."""
    for key, t in saved.items():
        mine = own.get(key)
        if not isinstance(mine, torch.Tensor):
            continue  # not in the model (torch reports it), or a module's extra state
        if not isinstance(t, torch.Tensor):
            report.wrong_type.append((key, f"a {type(t).__name__}", f"a {mine.dtype} tensor"))
        elif is_lazy(mine):
            continue  # materialised from the file: any shape fits
        elif t.shape != mine.shape:
            report.mismatched.append((key, tuple(t.shape), tuple(mine.shape)))
        elif _kind(t.dtype) != _kind(mine.dtype):
            report.wrong_type.append((key, f"a {t.dtype} tensor", f"a {mine.dtype} tensor"))
        elif t.dtype != mine.dtype and _changed_by_cast(t, mine.dtype):
            report.wrong_type.append((key, f"a {t.dtype} tensor with values {mine.dtype} "
                                           f"cannot hold", f"a {mine.dtype} tensor"))
    return {m[0] for m in report.mismatched} | {w[0] for w in report.wrong_type}


def _changed_by_cast(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether converting ``t`` to ``dtype`` (same kind) changes a value beyond rounding: an
    integer that does not fit, or a finite float that becomes infinite."""
    cast = t.to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return bool((torch.isfinite(t) & ~torch.isfinite(cast)).any())
    return not torch.equal(cast.to(t.dtype), t)


_EXTRA = "_extra_state"  # torch's key suffix for a module's get_extra_state()


def _backup(own: dict, keys) -> dict:
    """What a load may change: a copy of every tensor (load hooks may write keys the file
    lacks) and of the extra state of the modules the file has extra state for."""
    backup = {}
    for k, t in own.items():
        if k.endswith(_EXTRA):
            if k in keys:
                try:
                    backup[k] = copy.deepcopy(t)
                except Exception:  # not copyable: keep the object itself
                    backup[k] = t
        elif isinstance(t, torch.Tensor) and not is_lazy(t):
            backup[k] = t.detach().clone()
    return backup


def _restore(model: nn.Module, own: dict, backup: dict):
    """Put back what a load changed: each tensor's values, into the model's own tensor
    (registered again where a load hook replaced it), and each module's extra state through
    ``set_extra_state``. Every key is tried; returns the first error (None if none)."""
    first = None
    now = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, saved in backup.items():
            try:
                if key.endswith(_EXTRA):
                    model.get_submodule(key[:-len(_EXTRA)].rstrip(".")).set_extra_state(saved)
                    continue
                original = own[key]
                if now.get(key) is original and torch.equal(original, saved):
                    continue  # untouched (and perhaps not writable: an inference tensor)
                if now.get(key) is not original:  # a load hook put another tensor there
                    owner, _, name = key.rpartition(".")
                    module = model.get_submodule(owner)
                    table = module._parameters if name in module._parameters else module._buffers
                    table[name] = original
                original.copy_(saved)
            except Exception as exc:  # (a tensor torch cannot write: keep going)
                first = first or exc
    return first


def _check_not_meta(own: dict, name: str) -> None:
    meta = [k for k, t in own.items() if isinstance(t, torch.Tensor) and t.is_meta
            and not is_lazy(t)]
    if meta:
        raise StateDictMismatchError(
            f"{name} has tensors on the meta device ({meta[0]!r}"
            f"{' and more' if len(meta) > 1 else ''}), "
            f"which hold no data to load into; materialise it first "
            f"(model.to_empty(device=...)) or use model.load_state_dict(..., assign=True)")


def load_model(model: nn.Module, path, strict: bool = True, map_location=None, *,
               verify: bool = True) -> LoadReport:
    """Load the state_dict saved at ``path`` into ``model`` and report how the keys matched.

    strict: True (default) raises :class:`StateDictMismatchError` listing every missing,
        unexpected, mis-shaped and mis-typed key, and leaves ``model`` exactly as it was
        (bitwise, modules' extra state too; lazy layers the file materialised stay
    materialised); False loads every
        key that fits and returns the report of the rest.
    map_location: where tensors are loaded before copying (default: the model's device, so
        a file saved on a GPU loads into a CPU model).
    verify: as in :func:`fastlayers.io.load`.
    Every key is checked before anything is copied: the file must hold a tensor where the
    model has one, of the same shape (any shape for an uninitialised lazy parameter) and a
    dtype of the same kind (bool, integer, floating or complex: torch converts within a
    kind, e.g. float64 into a float32 model) whose values survive the conversion (no
    integer out of range, no finite float turned infinite). A model with meta tensors is
    refused (they hold no data). Key checks are torch's own (load hooks, such
    as a module accepting a file without one of its buffers, are honoured). If torch or a
    module's hook raises while loading, the tensors are put back and
    StateDictMismatchError (chained to that exception) is raised, in both modes. Costs
    one copy of the model's tensors while loading.
    """
    from .io import load
    name = type(model).__name__
    own = model.state_dict(keep_vars=True)
    _check_not_meta(own, name)
    saved = load(path, _model_device(model) if map_location is None else map_location,
                 verify=verify)
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise StateDictMismatchError(f"{os.fspath(path)} does not hold a state_dict "
                                     f"(got {type(saved).__name__}), so it cannot load into {name}")
    report = LoadReport(os.fspath(path), name)
    rejected = _check_keys(saved, own, report)
    fitting = OrderedDict((k, v) for k, v in saved.items() if k not in rejected)
    if hasattr(saved, "_metadata"):
        fitting._metadata = saved._metadata
    backup = _backup(own, fitting)
    try:
        result = model.load_state_dict(fitting, strict=False)
    except Exception as exc:
        stuck = _restore(model, own, backup)
        left = "the model was left as it was" if stuck is None else \
            f"putting the model back failed too: {str(stuck).strip()}"
        raise StateDictMismatchError(f"cannot load {os.fspath(path)} into {name}: "
                                     f"{str(exc).strip()} ({left})") from exc
    report.missing_keys = [k for k in result.missing_keys if k not in rejected]
    report.unexpected_keys = list(result.unexpected_keys)
    if strict and not report.ok:
        stuck = _restore(model, own, backup)
        raise StateDictMismatchError(str(report) + ("" if stuck is None else
                                     f" (putting the model back failed: {stuck})"))
    return report
