"""Bounds-checked Triton interpreter: the CPU stand-in for a GPU memory checker.

:func:`install` wraps Triton's interpreter (``triton.runtime.interpreter``, triton 3.6 to
3.9) at two points:

* ``GridExecutor`` (one kernel launch): records every tensor argument of the launch (and
  the base of each host-side ``TensorDescriptor``) as a view: data pointer, element size,
  shape and strides;
* ``InterpreterBuilder.create_masked_load / create_masked_store / create_atomic_rmw /
  create_atomic_cas`` (every ``tl.load``, ``tl.store``, atomic and tensor-descriptor
  access goes through these): each address whose mask is true must be the address of an
  element of some argument's view (for views whose elements do not overlap: the exact
  element set, so a view's gaps and the rest of its storage are outside; for
  overlapping views or accesses of another element size: the view's byte extent).

An address outside every argument raises :class:`BoundsError` (wrapped by the interpreter
in its ``InterpreterError``) naming the kernel, the program id, the argument the access
belongs to and the offset in its elements, and is recorded in :data:`violations` so a test
that swallows the exception still fails (tests/conftest.py checks after each test).
Cost: a few numpy operations per load/store on arrays the interpreter has built anyway.
"""
import numpy as np
import torch

violations = []  # messages of out-of-bounds accesses not yet taken by a test
_launches = []   # stack of the launches in progress: (kernel name, [views])
_saved = {}      # (owner, attribute) -> the original, while installed


class BoundsError(AssertionError):
    """An unmasked load or store outside every tensor passed to the kernel."""


class _View:
    """The addresses of one tensor argument's elements (a view: pointer, shape, strides)."""

    def __init__(self, name: str, t: torch.Tensor):
        self.name = name
        self.ptr = t.data_ptr()
        self.elsize = t.element_size()
        self.shape, self.strides = tuple(t.shape), tuple(t.stride())
        self.offset = t.storage_offset()
        span = sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        self.end = self.ptr + (span + 1) * self.elsize if t.numel() else self.ptr
        # Dims that move the address, largest stride first; their elements are distinct
        # addresses (greedy decomposition is exact) when each stride exceeds the span of
        # the smaller ones.
        self.dims = sorted(((s, n) for n, s in zip(self.shape, self.strides) if n > 1 and s),
                           reverse=True)
        inner = 0
        self.exact = True
        for s, n in reversed(self.dims):
            self.exact &= s > inner
            inner += (n - 1) * s

    def covers(self, addrs: np.ndarray, size: int) -> np.ndarray:
        """Which of ``addrs`` (int64 byte addresses) start an element of this view (for a
        ``size``-byte access of another element size: lie inside its byte extent)."""
        ok = (addrs >= self.ptr) & (addrs + size <= self.end)
        if size != self.elsize or not self.exact or not ok.any():
            return ok
        off = addrs - self.ptr
        ok &= off % self.elsize == 0
        rem = off // self.elsize
        for s, n in self.dims:
            idx = rem // s
            ok &= idx < n
            rem = rem - idx * s
        return ok & (rem == 0)

    def describe(self) -> str:
        return (f"shape {self.shape}, strides {self.strides}, storage offset {self.offset}, "
                f"{self.elsize}-byte elements")


def _add_views(views, name, arg):
    from triton.tools.tensor_descriptor import TensorDescriptor
    if isinstance(arg, (tuple, list)):
        for i, a in enumerate(arg):
            _add_views(views, f"{name}[{i}]", a)
    elif isinstance(arg, TensorDescriptor):
        _add_views(views, f"{name}.base", arg.base)
    elif hasattr(arg, "data_ptr"):
        t = getattr(arg, "base", arg)  # triton's TensorWrapper (a reinterpreting view)
        if isinstance(t, torch.Tensor):
            views.append(_View(name, t))


def _check(kind: str, ptrs, mask):
    """Fail unless every active address of this access lies in an argument of the launch."""
    if not _launches:
        return
    addrs = np.asarray(ptrs.data)
    active = addrs if mask is None else addrs[np.broadcast_to(np.asarray(mask.data, bool),
                                                              addrs.shape)]
    if active.size == 0:
        return
    active = active.astype(np.int64).ravel()
    size = ptrs.get_element_ty().primitive_bitwidth // 8
    kernel, views = _launches[-1]
    left = active
    best, best_hits = None, 0
    for i, view in enumerate(views):
        hit = view.covers(left, size)
        hits = int(hit.sum())
        if hits:
            if hits > best_hits:
                best, best_hits = view, hits
            left = left[~hit]
            if i:  # the view just used goes first next time
                views.insert(0, views.pop(i))
            if left.size == 0:
                return
    bad = int(left[0])
    # The argument this access belongs to: the one holding most of its good addresses, or
    # when none is good, the nearest argument that starts below the bad address.
    if best is None:
        below = [v for v in views if v.ptr <= bad]
        best = max(below, key=lambda v: v.ptr) if below else None
    from triton.runtime import interpreter
    pid = tuple(interpreter.interpreter_builder.grid_idx or ())
    where = "no tensor argument at or below it" if best is None else (
        f"{best.name} + {(bad - best.ptr) / best.elsize:g} elements (byte offset "
        f"{bad - best.ptr}), outside {best.name}'s view ({best.describe()})")
    msg = (f"bounds check: kernel {kernel}, program {pid}: unmasked {kind} of "
           f"{left.size} of {active.size} active {size}-byte addresses outside every tensor "
           f"argument; first at {where}")
    violations.append(msg)
    raise BoundsError(msg)


def _wrap_builder(name, pick):
    """Replace InterpreterBuilder.<name> by a checked version; ``pick(args)`` gives
    (kind, ptrs, mask) from the positional arguments after ``self``."""
    from triton.runtime.interpreter import InterpreterBuilder
    orig = getattr(InterpreterBuilder, name)
    _saved[(InterpreterBuilder, name)] = orig

    def checked(self, *args, **kwargs):
        _check(*pick(args))
        return orig(self, *args, **kwargs)
    setattr(InterpreterBuilder, name, checked)


def install() -> None:
    """Turn the bounds check on for every later interpreter launch (idempotent)."""
    if _saved:
        return
    from triton.runtime.interpreter import GridExecutor
    _wrap_builder("create_masked_load", lambda a: ("load", a[0], a[1]))
    _wrap_builder("create_masked_store", lambda a: ("store", a[0], a[2]))
    _wrap_builder("create_atomic_rmw", lambda a: ("atomic", a[1], a[3]))
    _wrap_builder("create_atomic_cas", lambda a: ("atomic_cas", a[0], None))

    call, init = GridExecutor.__call__, GridExecutor._init_args_hst
    _saved[(GridExecutor, "__call__")] = call
    _saved[(GridExecutor, "_init_args_hst")] = init

    def launch(self, *args, **kwargs):
        _launches.append((getattr(self.fn, "__name__", "?"), []))
        try:
            return call(self, *args, **kwargs)
        finally:
            _launches.pop()

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        if _launches:  # the host copies: the addresses the interpreter will touch
            views = _launches[-1][1]
            for name, arg in zip(self.arg_names, args_hst):
                _add_views(views, name, arg)
            for name, arg in kwargs_hst.items():
                _add_views(views, name, arg)
        return args_hst, kwargs_hst
    GridExecutor.__call__, GridExecutor._init_args_hst = launch, init_args


def uninstall() -> None:
    """Restore the interpreter's own methods."""
    while _saved:
        (owner, name), orig = _saved.popitem()
        setattr(owner, name, orig)


def installed() -> bool:
    return bool(_saved)


def take_violations() -> list:
    """The recorded violation messages (and forget them)."""
    out = violations[:]
    violations.clear()
    return out
