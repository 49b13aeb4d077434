"""Find the fusable patterns in a Dynamo (torch-level) FX graph.

A candidate becomes a :class:`Match` whose ``reason`` is None when replacing it is invisible
to the user, or says why it is left alone. The conditions, for every pattern:

* every intermediate value (the pre-activation, ``x @ W``) has exactly one user, the next
  op of the pattern: a value that is returned, hooked, stored or read elsewhere is kept;
* float32/float16/bfloat16 operands on one CPU or CUDA device, with the dtypes eager torch
  would produce (an autocast that changes ``x @ W + b``'s dtype, float64, complex and
  integer tensors are left to torch); centering fp32 only (16-bit eager rounds the mean to
  16 bits first, the fused op does not);
* static shapes that fit the fused op (2-D weight, bias [out]); symbolic sizes must be
  provably equal;
* no in-place op anywhere between the pattern's first and last node;
* no module whose call starts or ends inside the pattern carries hooks (checked where the
  module objects are known; hooks that read or change a value already show up as extra
  users in the graph), and no global module hooks.
"""
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn import functional as F

from .._backend import KERNEL_DTYPES

PATTERNS = ("linear_relu", "centered", "fixed_hidden")
FUSABLE_DEVICES = ("cpu", "cuda")

_RELU = ({torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_},
         {"relu", "relu_"})
_LINEAR = ({torch._C._nn.linear, F.linear}, set())
_ADDMM = ({torch.addmm, torch.Tensor.addmm}, {"addmm"})
_MATMUL = ({operator.matmul, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm},
           {"matmul", "mm", "__matmul__"})
_ADD = ({operator.add, torch.add, torch.Tensor.add}, {"add", "__add__", "__radd__"})
_SUB = ({operator.sub, torch.sub, torch.Tensor.sub}, {"sub", "__sub__"})
_MEAN = ({torch.mean, torch.Tensor.mean}, {"mean"})
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.setitem}
_STATE_NAMES = ("grad", "autocast", "inference_mode", "_enter", "_exit", "_set_", "hook")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                      "_global_backward_hooks", "_global_backward_pre_hooks")


@dataclass
class Match:
    """One candidate. nodes: the pattern's nodes in graph order, the last one's value is the
    result; fn/args: the name of the fused call in ``rewrite.FUSED`` that replaces it and
    its arguments (Nodes or constants); reason: None when it is fused, else why it is left
    alone."""
    pattern: str
    nodes: Tuple[Node, ...]
    fn: Optional[str] = None
    args: Tuple[Any, ...] = ()
    reason: Optional[str] = None


def _is(node, ops) -> bool:
    funcs, methods = ops
    if not isinstance(node, Node):
        return False
    return ((node.op == "call_function" and node.target in funcs)
            or (node.op == "call_method" and node.target in methods))


def _bind(node: Node, names: Sequence[str], optional=None) -> Optional[Dict[str, Any]]:
    """node's arguments by name (positional first), or None for an unknown keyword or too
    many positionals. ``optional``: keyword -> the only value accepted for it."""
    optional = optional or {}
    if len(node.args) > len(names):
        return None
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key in names and key not in bound:
            bound[key] = value
        elif key in optional and value == optional[key]:
            continue
        else:
            return None
    return bound


def val(arg):
    """The fake tensor (or value) Dynamo recorded for a node; constants as they are."""
    return arg.meta.get("example_value") if isinstance(arg, Node) else arg


def _tensor_problem(tensors: Dict[str, Any]) -> Optional[str]:
    """None when all named tensors share one fusable dtype and one CPU/CUDA device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            return f"{name} has no recorded tensor value"
    dtypes = {t.dtype for _, t in items}
    devices = {t.device for _, t in items}
    if len(dtypes) != 1:
        return "operands have different dtypes " + ", ".join(f"{n}={t.dtype}" for n, t in items)
    dtype = dtypes.pop()
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} has no fused kernel (float32, float16, bfloat16 only)"
    if len(devices) != 1:
        return "operands are on different devices"
    device = devices.pop()
    if device.type not in FUSABLE_DEVICES:
        return f"device {device} is not fused (cpu and cuda only)"
    return None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _single_users(chain: Sequence[Node]) -> Optional[str]:
    """Each node of ``chain`` but the last is used only by the next one."""
    for node, nxt in zip(chain, chain[1:]):
        others = [u.name for u in node.users if u is not nxt]
        if others or len(node.users) != 1:
            return (f"`{node.name}` has other users ({', '.join(others) or 'the output'}); "
                    f"fusing would lose the value they read")
    return None


def _mutates(node: Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def _module_keys(node: Node) -> List[str]:
    return [k.split("@")[0] for k in (node.meta.get("nn_module_stack") or {})]


def _hook_problem(nodes: Sequence[Node], modules: Dict[str, torch.nn.Module]) -> Optional[str]:
    """A module whose call boundary lies inside the pattern must carry no hooks."""
    stacks = [set(_module_keys(n)) for n in nodes]
    inside = set.union(*stacks) - set.intersection(*stacks)
    if not inside:
        return None
    module_api = torch.nn.modules.module
    if any(getattr(module_api, d, None) for d in _GLOBAL_HOOK_DICTS):
        return "global module hooks are registered (they see every module's output)"
    for key in sorted(inside):
        mod = modules.get(key)
        if mod is not None and any(getattr(mod, d, None) for d in _HOOK_DICTS):
            return f"module {type(mod).__name__} inside the pattern has hooks"
    return None


def _changes_state(node: Node) -> bool:
    """A grad-mode/autocast switch or any call without a recorded value (side effects):
    the fused op, placed at the pattern's last node, would run under other settings."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(k in name for k in _STATE_NAMES) or node.meta.get("example_value") is None


def _window_problem(graph_nodes: List[Node], index: Dict[Node, int],
                    nodes: Sequence[Node]) -> Optional[str]:
    """The fused op runs where the pattern's last node ran: nothing in between may mutate
    a tensor or change grad mode, autocast or other global state."""
    lo, hi = index[nodes[0]], index[nodes[-1]]
    for n in graph_nodes[lo + 1:hi]:
        if n in nodes:
            continue
        if _mutates(n):
            return f"in-place op `{n.name}` runs between the pattern's ops"
        if _changes_state(n):
            return f"`{n.name}` (grad mode, autocast or another side effect) runs in between"
    return None


# ----------------------------------------------------------------------------- the patterns
def _match_relu(relu: Node) -> Optional[Match]:
    """Linear+ReLU (F.linear, addmm, x @ W + b) or relu(x @ W + c) ending in ``relu``."""
    bound = _bind(relu, ("input", "inplace"))
    pre = bound and bound.get("input")
    if not isinstance(pre, Node):
        return None
    if _is(pre, _LINEAR):
        b = _bind(pre, ("input", "weight", "bias"))
        if b is None:
            return None
        x, w, bias = b.get("input"), b.get("weight"), b.get("bias")
        m = Match("linear_relu", (pre, relu), "linear_relu", (x, w, bias))
        xv, wv, bv = val(x), val(w), val(bias)
        m.reason = _tensor_problem({"input": xv, "weight": wv, "bias": bv})
        if m.reason is None and not isinstance(val(relu), torch.Tensor):
            m.reason = "the result has no recorded tensor value"
        if m.reason is None and (wv.dim() != 2 or xv.dim() == 0 or (
                bias is not None and (bv.dim() != 1 or not _same(bv.shape[0], wv.shape[0])))):
            m.reason = "shapes do not fit linear_relu (2-D weight, bias [out])"
        return m
    if _is(pre, _ADDMM):
        b = _bind(pre, ("input", "mat1", "mat2"), optional={"beta": 1, "alpha": 1})
        if b is None:
            return None
        bias, x, w = b.get("input"), b.get("mat1"), b.get("mat2")
        m = Match("linear_relu", (pre, relu), "addmm_relu", (bias, x, w))
        m.reason = _matmul_bias_problem(x, w, bias, (pre,))
        return m
    if _is(pre, _ADD):
        b = _bind(pre, ("input", "other"), optional={"alpha": 1})
        if b is None:
            return None
        a, o = b.get("input"), b.get("other")
        mm, other = (a, o) if _is(a, _MATMUL) else (o, a) if _is(o, _MATMUL) else (None, None)
        if mm is None:
            return None
        mb = _bind(mm, ("input", "other"))
        if mb is None:
            return None
        x, w = mb.get("input"), mb.get("other")
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            m = Match("fixed_hidden", (mm, pre, relu), "fixed_hidden", (x, w, float(other)))
            xv, wv = val(x), val(w)
            m.reason = _tensor_problem({"input": xv, "weight": wv})
            if m.reason is None and (wv.dim() != 2 or xv.dim() == 0):
                m.reason = "shapes do not fit fixed_hidden (2-D weight)"
            if m.reason is None and wv.requires_grad:
                m.reason = "W requires grad (fixed_hidden needs a frozen weight)"
            if m.reason is None and not (val(mm).dtype == val(pre).dtype == xv.dtype):
                m.reason = "the result's dtype differs from the operands' (autocast)"
            return m
        if isinstance(other, Node):
            m = Match("linear_relu", (mm, pre, relu), "matmul_bias_relu", (x, w, other))
            m.reason = _matmul_bias_problem(x, w, other, (mm, pre))
            return m
        return Match("fixed_hidden", (mm, pre, relu),
                     reason=f"the added constant {other!r} is not a Python number")
    return None


def _matmul_bias_problem(x, w, bias, results) -> Optional[str]:
    xv, wv, bv = val(x), val(w), val(bias)
    problem = _tensor_problem({"input": xv, "weight": wv, "bias": bv})
    if problem:
        return problem
    if wv.dim() != 2 or xv.dim() == 0 or bv.dim() != 1 or not _same(bv.shape[0], wv.shape[1]):
        return "shapes do not fit linear_relu (2-D weight, bias [out])"
    if any(not isinstance(val(r), torch.Tensor) or val(r).dtype != xv.dtype for r in results):
        return "the result's dtype differs from the operands' (autocast or type promotion)"
    return None


def _match_sub(sub: Node) -> Optional[Match]:
    """x - x.mean() or x - x.mean(dim, keepdim=True)."""
    b = _bind(sub, ("input", "other"), optional={"alpha": 1})
    if b is None or not _is(b.get("other"), _MEAN):
        return None
    x, mean = b.get("input"), b.get("other")
    mb = _bind(mean, ("input", "dim", "keepdim"), optional={"dtype": None})
    if mb is None or mb.get("input") is not x:
        return None
    dim, keepdim = mb.get("dim"), mb.get("keepdim", False)
    m = Match("centered", (mean, sub), "centered", (x, dim))
    if dim is not None and not keepdim:
        m.reason = "mean over dims without keepdim=True broadcasts differently"
    elif not (dim is None or isinstance(dim, int) or (
            isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim))):
        m.reason = f"dim {dim!r} is not a constant"
    else:
        xv = val(x)
        m.reason = _tensor_problem({"input": xv})
        if m.reason is None and val(sub).dtype != xv.dtype:
            m.reason = "the result's dtype differs from the input's"
        elif m.reason is None and xv.dtype in (torch.float16, torch.bfloat16):
            m.reason = (f"{xv.dtype}: eager rounds the mean to 16 bits before subtracting, "
                        f"the fused op keeps it in fp32 (one rounding), so results differ")
    return m


def find_matches(graph: torch.fx.Graph, patterns=PATTERNS,
                 modules: Optional[Dict[str, torch.nn.Module]] = None) -> List[Match]:
    """Every candidate in ``graph``, fusable ones with ``reason=None``.

    patterns: the pattern names to fuse (others are reported as not selected).
    modules: str(id(module)) -> module, for the hook check (keys of ``nn_module_stack``).
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    matches = []
    for node in nodes:
        m = _match_relu(node) if _is(node, _RELU) else _match_sub(node) if _is(node, _SUB) else None
        if m is not None:
            if m.reason is None:
                m.reason = _common_problem(m, patterns, modules or {}, nodes, index)
            matches.append(m)
    return matches


def _common_problem(m: Match, patterns, modules, nodes, index) -> Optional[str]:
    if m.pattern not in patterns:
        return "pattern not selected"
    # the mean may have other users: it is then kept, only x - mean is fused
    return (_single_users(m.nodes if m.pattern != "centered" else ())
            or _hook_problem(m.nodes, modules)
            or _window_problem(nodes, index, m.nodes))
