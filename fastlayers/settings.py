"""Every ``FASTLAYERS_*`` switch: parsed once, at import, by one rule, documented in one table.

| variable | values | default | what it does |
|---|---|---|---|
| ``FASTLAYERS_BACKEND`` | auto, torch, triton | auto | which path runs the ops (see :mod:`fastlayers._backend`) |
| ``FASTLAYERS_CHECK`` | a flag | off | opt-in checks that may sync the GPU (halving of ±inf raises) |
| ``FASTLAYERS_AUTOTUNE`` | a flag | off | GPU GEMMs search their config list per shape instead of the heuristic |
| ``FASTLAYERS_TMA`` | a flag | off | GPU GEMMs take the persistent TMA kernel where operands allow |
| ``FASTLAYERS_REQUIRE_TRITON`` | a flag | off | tests: fail instead of skipping kernel tests when triton is unusable |
| ``FASTLAYERS_BOUNDS_CHECK`` | a flag | on | tests: check every interpreted kernel load/store against its tensors |
| ``FASTLAYERS_TOUR_FAIL`` | a section name, or all | (none) | the tour (read when it starts): perturb a section to show its failure report |

A flag is one of 0/1, true/false, yes/no, on/off (any case, surrounding spaces ignored);
empty or unset means the default. Anything else is a ``ValueError`` naming the variable.
Names are case-insensitive everywhere (``FASTLAYERS_BACKEND=Torch``, ``set_backend('TORCH')``).

Change a switch later with :func:`update` (e.g. ``fastlayers.settings.update(autotune=True)``);
the hot paths read the parsed values, never the environment.
"""
import os
import sys
from typing import Optional

BACKENDS = ("auto", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# variable -> (attribute, kind, default); kind: "flag", "backend" or "text"
SETTINGS = {
    "FASTLAYERS_BACKEND": ("backend", "backend", "auto"),
    "FASTLAYERS_CHECK": ("check", "flag", False),
    "FASTLAYERS_AUTOTUNE": ("autotune", "flag", False),
    "FASTLAYERS_TMA": ("tma", "flag", False),
    "FASTLAYERS_REQUIRE_TRITON": ("require_triton", "flag", False),
    "FASTLAYERS_BOUNDS_CHECK": ("bounds_check", "flag", True),
    "FASTLAYERS_TOUR_FAIL": ("tour_fail", "text", None),
}


def parse_flag(name: str, value: Optional[str], default: bool = False) -> bool:
    """``value`` of variable ``name`` as a bool (see the module doc for the accepted words)."""
    v = (value or "").strip().lower()
    if not v:
        return default
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)} "
                     f"(any case), got {value!r}")


def parse_backend(name: str, value: Optional[str], default: str = "auto") -> str:
    """A backend name, case-insensitive: 'auto', 'torch' or 'triton'."""
    if not isinstance(value, (str, type(None))):
        raise TypeError(f"{name} must be a string, one of {BACKENDS}, got {value!r}")
    v = (value or "").strip().lower() or default
    if v not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS} (any case), got {value!r}")
    return v


def _parse(var: str, kind: str, default, value):
    if kind == "flag":
        return parse_flag(var, value, default)
    if kind == "backend":
        return parse_backend(var, value, default)
    return (value or "").strip().lower() or default  # names: any case


# The parsed values, read by the rest of the package (module attributes: cheap to read).
backend: str = "auto"
check: bool = False
autotune: bool = False
tma: bool = False
require_triton: bool = False
bounds_check: bool = True
tour_fail: Optional[str] = None


def load(environ=os.environ) -> None:
    """(Re)parse every switch from ``environ``; called once at import."""
    parsed = {attr: _parse(var, kind, default, environ.get(var))
              for var, (attr, kind, default) in SETTINGS.items()}
    update(**parsed)


def update(**values) -> dict:
    """Set switches by attribute name (backend, check, autotune, tma, ...); returns the
    previous values of those given. Values are validated as the environment's are, all of
    them before any is set: a bad one raises and changes nothing."""
    attrs = {attr: (var, kind) for var, (attr, kind, _d) in SETTINGS.items()}
    checked = {}
    for attr, value in values.items():
        if attr not in attrs:
            raise KeyError(f"fastlayers.settings: no setting {attr!r}; known: {sorted(attrs)}")
        var, kind = attrs[attr]
        if kind == "flag" and not isinstance(value, bool):
            raise TypeError(f"fastlayers.settings: {attr} ({var}) must be a bool, got {value!r}")
        if kind == "text" and not isinstance(value, (str, type(None))):
            raise TypeError(f"fastlayers.settings: {attr} ({var}) must be a string or None, "
                            f"got {value!r}")
        if kind != "flag":
            value = _parse(var, kind, None if kind == "text" else "auto", value)
        checked[attr] = value
    previous = {attr: globals()[attr] for attr in checked}
    globals().update(checked)
    _push_to_kernels()
    return previous


def _push_to_kernels() -> None:
    """kernels/ never imports fastlayers: hand it the switches it needs."""
    try:
        from fastlayers.kernels import runtime
    except ImportError:  # no triton
        return
    runtime.configure(autotune=autotune, tma=tma)


def read(var: str, environ=os.environ):
    """Parse one switch from ``environ`` now, by its rule (for switches a program reads
    when it starts, such as the tour's ``FASTLAYERS_TOUR_FAIL``)."""
    _attr, kind, default = SETTINGS[var]
    return _parse(var, kind, default, environ.get(var))


def as_dict() -> dict:
    """Every switch's current value, by attribute name."""
    return {attr: globals()[attr] for attr, _k, _d in SETTINGS.values()}


def _running_the_tour() -> bool:
    """Whether this process is ``python -m fastlayers`` (importing the package first)."""
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "fastlayers" for a, b in zip(argv, argv[1:]))


try:
    load()
except ValueError as exc:  # a bad FASTLAYERS_* value: for the tour, a message and exit 2
    if not _running_the_tour():  # (bad arguments), as for its own options
        raise
    print(f"python -m fastlayers: {exc}", file=sys.stderr)
    sys.exit(2)
