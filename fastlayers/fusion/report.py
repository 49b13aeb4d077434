"""What the backend fused and what it left alone, with the user's source lines."""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .patterns import PATTERNS, Match

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n[ \t]*([^\n]*)')
_ROOT = re.compile(r"^L\['[^']*'\]\.?")


@dataclass(frozen=True)
class Fusion:
    """One fused occurrence. pattern: 'linear_relu', 'centered' or 'fixed_hidden';
    location: 'file:line' of the user's code (innermost frame Dynamo recorded), code: that
    line; modules: the modules (dotted paths from the compiled module) the ops ran in;
    nodes: the FX node names replaced."""
    pattern: str
    location: str
    code: str
    modules: tuple
    nodes: tuple

    def __str__(self):
        where = f" [{', '.join(self.modules)}]" if self.modules else ""
        return f"{self.pattern:<13} {self.location}: {self.code}{where}"


@dataclass(frozen=True)
class Skip(Fusion):
    """A candidate left alone; reason says why."""
    reason: str = ""

    def __str__(self):
        return f"{super().__str__()}\n{'':<14}left alone: {self.reason}"


def _frame(node):
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return frames[-1] if frames else None


def _location(match: Match):
    """('file:line', code) of the pattern's last op; 'file:first-last' when its first op
    is on an earlier line of the same file."""
    last, first = _frame(match.nodes[-1]), _frame(match.nodes[0])
    if last is None:  # e.g. a bare nn.Sequential: no frame of user code, see `modules`
        return "<no user source line>", ""
    path, line, _func, code = last
    if first is not None and first[0] == path and int(first[1]) < int(line):
        line = f"{first[1]}-{line}"
    return f"{path}:{line}", code.strip()


def _modules(match: Match) -> tuple:
    names = []
    for node in match.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack:
            name = _ROOT.sub("", str(stack[-1][0])) or "<root>"
            if name not in names:
                names.append(name)
    return tuple(names)


def record(match: Match):
    """A :class:`Fusion` (reason None) or :class:`Skip` for a match."""
    location, code = _location(match)
    common = dict(pattern=match.pattern, location=location, code=code,
                  modules=_modules(match), nodes=tuple(n.name for n in match.nodes))
    return Fusion(**common) if match.reason is None else Skip(**common, reason=match.reason)


@dataclass
class FusionReport:
    """Fusions and skips over every graph one backend compiled (a model with graph breaks
    or recompilations gives several graphs). ``counts()``: fusions per pattern."""
    fusions: List[Fusion] = field(default_factory=list)
    skipped: List[Skip] = field(default_factory=list)
    graphs: int = 0

    def add(self, matches: List[Match]) -> None:
        self.graphs += 1
        for m in matches:
            r = record(m)
            (self.skipped if isinstance(r, Skip) else self.fusions).append(r)

    def counts(self, patterns=PATTERNS) -> Dict[str, int]:
        return {p: sum(f.pattern == p for f in self.fusions) for p in patterns}

    def clear(self) -> None:
        self.fusions.clear()
        self.skipped.clear()
        self.graphs = 0

    def __str__(self) -> str:
        counts = ", ".join(f"{p} x{n}" for p, n in self.counts().items())
        lines = [f"fastlayers fusion report: {self.graphs} graph(s); fused {counts}"]
        lines += [f"  {f}" for f in self.fusions]
        if self.skipped:
            lines.append(f"  not fused ({len(self.skipped)}):")
            lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)

    def reasons(self, pattern: Optional[str] = None) -> List[str]:
        """The skip reasons (of one pattern, or all)."""
        return [s.reason for s in self.skipped if pattern in (None, s.pattern)]
