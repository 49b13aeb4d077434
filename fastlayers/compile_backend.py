"""The ``fastlayers`` torch.compile backend: fused kernels for an unmodified model.

    model = torch.compile(model, backend="fastlayers")             # after pip install
    model = torch.compile(model, backend=fastlayers.compile_backend.backend(
        patterns={"linear_relu"}))                                  # choose patterns
    print(fastlayers.explain(model, x))                             # what would fuse, where

Dynamo captures the model's torch-level FX graph; this backend replaces

* ``relu(F.linear(x, W, b))``, ``relu(torch.addmm(b, x, W))``, ``relu(x @ W + b)``
  -> ``fastlayers.functional.linear_relu`` (forward and backward fused),
* ``x - x.mean()``, ``x - x.mean(dim, keepdim=True)`` -> ``fastlayers.functional.centered``,
* ``relu(x @ W + c)``, W not requiring grad, c a Python number -> ``functional.fixed_hidden``,

where that is invisible to the user (see :mod:`fastlayers.fusion.patterns`: the
pre-activation has no other user, no hooks inside the pattern, float32/16/bf16 on CPU or
CUDA), then hands the graph to Inductor (``compile_fx``: aot_autograd, so training works).
The model object, its parameters, hooks and state_dict are untouched: only the compiled
graph changes. Which implementation the fused ops run (Triton or torch) follows
``fastlayers.use_backend`` as in eager mode, read when the graph is compiled (as for every
fastlayers op under torch.compile).

Options (``backend(...)`` arguments, or ``torch.compile(..., options={...})``):
patterns: names from ``PATTERNS`` to fuse (default all); inner: 'inductor' (default),
'aot_eager' or 'eager' (debugging: the rewritten graph without Inductor), or any backend
callable ``(gm, example_inputs) -> callable`` to hand the rewritten graph to; every other
option is an Inductor config patch (e.g. ``{"max_autotune": True}``), and ``mode=`` is
passed on to Inductor as torch.compile would.
"""
import logging
from typing import Dict, Iterable, Optional

import torch

from .fusion import PATTERNS, FusionReport, apply_matches, find_matches

log = logging.getLogger("fastlayers.compile")
INNER = ("inductor", "aot_eager", "eager")

__all__ = ["FastlayersBackend", "backend", "fastlayers_backend", "explain", "PATTERNS",
           "FusionReport"]


def _check_patterns(patterns) -> frozenset:
    if patterns is None:
        return frozenset(PATTERNS)
    if isinstance(patterns, str):
        patterns = {patterns}
    patterns = frozenset(patterns)
    unknown = patterns - set(PATTERNS)
    if unknown:
        raise ValueError(f"fastlayers backend: unknown pattern(s) {sorted(unknown)}; "
                         f"choose from {list(PATTERNS)}")
    return patterns


def _check_inner(inner):
    if not callable(inner) and inner not in INNER:
        raise ValueError(f"fastlayers backend: inner must be one of {INNER} or a backend "
                         f"callable, got {inner!r}")
    return inner


def _modules_in_scope() -> Dict[str, torch.nn.Module]:
    """str(id) -> module for the modules reachable from the frame Dynamo is compiling (the
    keys of ``nn_module_stack``), for the hook check. Best effort: Dynamo's current
    frame is internal API; without it the graph-level checks still apply."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        values = list(InstructionTranslator.current_tx().f_locals.values())
    except Exception:  # noqa: BLE001  (internal API moved: fall back to the graph checks)
        return {}
    found = {}
    for value in values:
        if isinstance(value, torch.nn.Module):
            found.update((str(id(m)), m) for m in value.modules())
    return found


class FastlayersBackend:
    """A torch.compile backend; ``report`` collects what it fused over every graph it
    compiled (see :class:`~fastlayers.fusion.FusionReport`).

    patterns: pattern names to fuse (None: all of ``PATTERNS``). inner: 'inductor',
    'aot_eager', 'eager' or a backend callable for the rewritten graph.
    inductor_options: Inductor config patches. rewrite: False only reports (``explain``)
    and runs the graph unchanged.
    """

    def __init__(self, patterns: Optional[Iterable[str]] = None, inner: str = "inductor",
                 inductor_options: Optional[dict] = None, rewrite: bool = True):
        self.patterns = _check_patterns(patterns)
        self.inner = _check_inner(inner)
        self.inductor_options = dict(inductor_options or {})
        self.rewrite = rewrite
        self.modules: Dict[str, torch.nn.Module] = {}
        self.report = FusionReport()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
        opts = dict(options or {})
        patterns = _check_patterns(opts.pop("patterns", self.patterns))
        inner = _check_inner(opts.pop("inner", self.inner))
        config = dict(self.inductor_options)
        if mode not in (None, "default"):
            from torch._inductor import list_mode_options
            config.update(list_mode_options(mode))
        config.update(opts)

        modules = {**_modules_in_scope(), **self.modules}
        matches = find_matches(gm.graph, patterns, modules)
        self.report.add(matches)
        fused = sum(m.reason is None for m in matches)
        log.info("fastlayers: fused %d of %d candidate(s) in a %d-node graph", fused,
                 len(matches), len(gm.graph.nodes))
        if self.rewrite:
            apply_matches(gm, matches)
        return _compile(gm, example_inputs, inner if self.rewrite else "eager", config)

    def __repr__(self):
        return f"FastlayersBackend(patterns={sorted(self.patterns)}, inner={self.inner!r})"


def _compile(gm, example_inputs, inner, config: dict):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=config or None)


def backend(patterns: Optional[Iterable[str]] = None, inner: str = "inductor",
            **inductor_options) -> FastlayersBackend:
    """A fastlayers backend with options: ``torch.compile(m, backend=backend(...))``.
    patterns: names from ``PATTERNS`` (None: all); inner: see :class:`FastlayersBackend`;
    keyword arguments: Inductor config patches. Its ``.report`` says what was fused."""
    return FastlayersBackend(patterns, inner, inductor_options)


# The backend `torch.compile(model, backend="fastlayers")` finds through the
# `torch_dynamo_backends` entry point; its `.report` accumulates over every compilation.
fastlayers_backend = FastlayersBackend()


def explain(model, *example_inputs, patterns: Optional[Iterable[str]] = None,
            dynamic: Optional[bool] = None, **example_kwargs) -> FusionReport:
    """What ``torch.compile(model, backend="fastlayers")`` would fuse, and where.

    Captures model's graphs with Dynamo by running ``model(*example_inputs,
    **example_kwargs)`` once, unchanged and without Inductor (like torch._dynamo.explain,
    the forward runs: BatchNorm statistics update in training mode). Returns a
    :class:`~fastlayers.fusion.FusionReport`: ``print()`` it, or read ``counts()``,
    ``fusions`` (pattern, file:line, code, modules) and ``skipped`` (with reasons).
    """
    probe = FastlayersBackend(patterns, inner="eager", rewrite=False)
    if isinstance(model, torch.nn.Module):
        probe.modules = {str(id(m)): m for m in model.modules()}
    torch.compile(model, backend=probe, dynamic=dynamic)(*example_inputs, **example_kwargs)
    return probe.report
