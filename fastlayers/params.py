"""Parameter and buffer inventory of a model: :func:`describe`.

``state_dict()``, ``named_parameters()`` and attribute access (``net[0][1][0].bias.data``)
stay torch's own and work unchanged on fused models (``LinearReLU`` has ``nn.Linear``'s
``weight`` and ``bias``). :func:`describe` adds what torch has no one-liner for: one row per
parameter and buffer over nested blocks, with shape, dtype, device, requires_grad, numel
and whether a gradient is present, as a list you can filter and a table you can print::

    table = fastlayers.params.describe(net)
    print(table)                                 # the table
    [r.name for r in table if r.requires_grad]   # rows are plain dataclasses
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy


@dataclass(frozen=True)
class ParamRow:
    """One parameter or buffer of a model.

    name: its dotted name (as in ``named_parameters()`` / ``named_buffers()``).
    kind: ``"parameter"`` or ``"buffer"``.
    shape: the shape as a tuple, or None while a lazy parameter is uninitialised.
    dtype, device: as on the tensor.
    requires_grad: the tensor's flag (False for buffers).
    numel: element count (0 while uninitialised).
    has_grad: True when ``.grad`` holds a tensor (after a backward pass).
    in_state_dict: False for non-persistent buffers (``persistent=False``).
    shared_with: for a tensor reachable under several names (tied weights, a module used
        twice), the first name it was listed under; None otherwise.
    """

    name: str
    kind: str
    shape: Optional[Tuple[int, ...]]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    numel: int
    has_grad: bool
    in_state_dict: bool = True
    shared_with: Optional[str] = None

    @property
    def note(self) -> str:
        notes = []
        if self.shape is None:
            notes.append("uninitialised (lazy)")
        if self.shared_with is not None:
            notes.append(f"shared with {self.shared_with}")
        if not self.in_state_dict:
            notes.append("not in state_dict")
        return ", ".join(notes)


class ParamTable(list):
    """The rows of :func:`describe` (a list of :class:`ParamRow`); ``str()`` and ``repr()``
    render an aligned table with totals, so ``print(describe(net))`` or evaluating
    ``describe(net)`` at a prompt shows it."""

    @property
    def total_numel(self) -> int:
        """Elements in all distinct parameters and buffers (tied tensors counted once)."""
        return sum(r.numel for r in self if r.shared_with is None)

    @property
    def trainable_numel(self) -> int:
        """Elements in distinct parameters with ``requires_grad=True``."""
        return sum(r.numel for r in self
                   if r.shared_with is None and r.kind == "parameter" and r.requires_grad)

    def row(self, name: str) -> ParamRow:
        """The row named ``name`` (KeyError listing the names if there is none)."""
        for r in self:
            if r.name == name:
                return r
        raise KeyError(f"no parameter or buffer named {name!r}; names: "
                       f"{', '.join(r.name for r in self) or '(none)'}")

    def __str__(self) -> str:
        header = ("name", "kind", "shape", "dtype", "device", "requires_grad", "numel", "has_grad",
                  "note")
        body = [(r.name, r.kind, "?" if r.shape is None else str(list(r.shape)),
                 str(r.dtype).replace("torch.", ""), str(r.device),
                 "yes" if r.requires_grad else "no", f"{r.numel:,}",
                 "yes" if r.has_grad else "no", r.note) for r in self]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        right = {6}  # numel column right-aligned

        def fmt(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        lines.append(f"{len(self)} tensors, {self.total_numel:,} elements "
                     f"({self.trainable_numel:,} trainable)")
        return "\n".join(lines)

    __repr__ = __str__


def _row(name, kind, t, *, in_state_dict=True, shared_with=None) -> ParamRow:
    lazy = is_lazy(t)
    return ParamRow(
        name=name, kind=kind, shape=None if lazy else tuple(t.shape), dtype=t.dtype,
        device=t.device, requires_grad=bool(t.requires_grad), numel=0 if lazy else t.numel(),
        has_grad=t.grad is not None, in_state_dict=in_state_dict, shared_with=shared_with)


def describe(model: nn.Module) -> ParamTable:
    """One :class:`ParamRow` per parameter, then per buffer, of ``model`` and every nested
    block, in registration order (the order of ``named_parameters()``).

    A tensor reachable under several names (the seed's shared layer at ``net[2]`` and
    ``net[4]``) gets a row per name, the later ones marked ``shared_with`` the first, and
    is counted once in the totals; ``named_parameters()`` would list it once.
    Uninitialised lazy parameters show ``shape=None``. Nothing is printed: ``print`` the
    returned :class:`ParamTable` for the table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"describe: expected an nn.Module, got {type(model).__name__}")
    rows = ParamTable()
    first_name = {}

    def shared(name, t):  # the first name seen for this tensor, unless it is this one
        first = first_name.setdefault(id(t), name)
        return None if first == name else first

    for name, p in model.named_parameters(remove_duplicate=False):
        rows.append(_row(name, "parameter", p, shared_with=shared(name, p)))
    for prefix, module in model.named_modules(remove_duplicate=False):
        non_persistent = module._non_persistent_buffers_set
        for bname, b in module._buffers.items():
            if b is None:
                continue
            name = f"{prefix}.{bname}" if prefix else bname
            rows.append(_row(name, "buffer", b, in_state_dict=bname not in non_persistent,
                             shared_with=shared(name, b)))
    return rows
