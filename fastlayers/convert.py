"""Rewrite a plain-torch model to use the fused layers (:func:`fuse`) and back (:func:`unfuse`).

    fused = fastlayers.fuse(net)        # a fused copy; net itself is untouched
    fastlayers.fuse(net, inplace=True)  # or rewrite net in place

The rule, applied recursively to every block of the model: inside a *chain container*,
a child that is exactly ``nn.Linear`` (or an uninitialised ``nn.LazyLinear``) immediately
followed by a child that is exactly ``nn.ReLU`` becomes ``LinearReLU`` (or
``LazyLinearReLU``) followed by ``nn.Identity``. Child names and indices do not change and
the fused layer holds the very same ``weight``/``bias`` Parameter objects, so
``state_dict()`` keys, ``net[i]`` indexing, tied weights and optimiser references are
unchanged, and a state_dict moves strictly between the fused and the unfused model.
:func:`unfuse` applies the reverse rule (``LinearReLU`` + ``nn.Identity`` -> ``nn.Linear`` +
``nn.ReLU``); the ``nn.ReLU`` it puts back is the one fuse() took out (``inplace=True``
and any other attribute included), or a new ``nn.ReLU()`` for an Identity fuse() did not make.

What a fused slot returns: the model's output is unchanged, but the slot that held the
Linear now returns the ReLU's output. ``net[0](x)``, ``net[:1](x)`` or a forward hook
registered on ``net[0]`` *after* fusing see post-ReLU values where the unfused model gave
pre-ReLU ones. To look inside, use ``unfuse(net)`` (or the original model), or keep the
model unfused and compile it instead.

What is recognised with certainty, and so rewritten:

* A chain container is a module whose forward passes its input through its children in
  order and nothing else: a module whose class uses ``nn.Sequential.forward`` or
  ``fastlayers.MySequential.forward`` unchanged, or whose ``forward`` compiles to the same
  bytecode as ``MySequential.forward`` (the seed's ``for module in self._modules.values():
  X = module(X)``; so a copy of the seed's class in your own code qualifies). Only there
  is a Linear's output known to reach nothing but the next child.
* Exact types only: subclasses of nn.Linear or nn.ReLU may override forward, so they are
  left alone.
* TorchScript modules (``torch.jit.script`` / ``torch.jit.trace``) and everything inside
  them are left alone: their compiled code does not call the Python children. The rest of
  the model is still fused.
* A pair whose Linear or ReLU carries hooks (forward, forward pre-, backward, full
  backward, state_dict or load_state_dict hooks: weight_norm, spectral_norm, an activation
  recorder, ...), or any pair while global module forward/backward hooks are registered
  (``nn.modules.module.register_module_forward_hook`` and friends), is left unfused: the
  hooks would see other values, or not run at all. fuse() says so with one
  :class:`SkippedFusionWarning` naming each module path and its hooks; the warning's
  ``skipped`` attribute holds the same as ``(path, reason)`` pairs. unfuse() does the same
  for a hooked ``LinearReLU`` or ``Identity``.
* So is a pair whose Linear (or LinearReLU) holds anything beyond weight and bias (an
  extra parameter, a buffer or a submodule: the new layer would drop it, changing
  state_dict keys and what an optimizer sees), or whose Linear or ReLU has a ``forward``
  set on the instance (the rewrite would bypass it); the same warning names them.
* An uninitialised lazy layer reachable under more than one name is left alone (it could
  not materialise consistently in two places); initialised shared layers are fine.

Anything else (a custom forward such as the seed's ``MLP``, ``FixedHiddenMLP``'s linear used
twice, a ``LinearReLU`` that is not followed by an ``nn.Identity``) is left as it is, silently:
use ``fastlayers.LinearReLU`` in such code directly.
"""
import copy
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import LazyLinearReLU, LinearReLU, MySequential

__all__ = ["fuse", "unfuse", "is_chain", "SkippedFusionWarning"]

# A module's hook dicts, and what the warning calls each.
_HOOKS = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook",
          "_backward_hooks": "backward hook", "_backward_pre_hooks": "backward pre-hook",
          "_state_dict_hooks": "state_dict hook", "_state_dict_pre_hooks": "state_dict pre-hook",
          "_load_state_dict_pre_hooks": "load_state_dict pre-hook",
          "_load_state_dict_post_hooks": "load_state_dict post-hook"}
# Hooks registered for every module (nn.modules.module.register_module_*_hook).
_GLOBAL_HOOKS = {"_global_forward_hooks": "global module forward hook",
                 "_global_forward_pre_hooks": "global module forward pre-hook",
                 "_global_backward_hooks": "global module backward hook",
                 "_global_backward_pre_hooks": "global module backward pre-hook"}
# Where fuse() keeps the nn.ReLU it replaced, on the nn.Identity that took its slot. Set in
# the instance __dict__, not as an attribute: not a submodule, not in state_dict or repr.
_RELU_KEY = "_fastlayers_fused_relu"


class SkippedFusionWarning(UserWarning):
    """fuse()/unfuse() left pairs as they were because of hooks or state the rewrite would
    not carry (see the module docstring). ``skipped``: a list of
    ``(module path, reason)``, e.g. ``("net.0", "nn.Linear carries a forward pre-hook")``."""

    def __init__(self, message: str, skipped: List[Tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


def _class_forward(module: nn.Module):
    """The ``forward`` attribute of ``module``'s class, found without running descriptors
    (TorchScript classes have a ``forward`` descriptor that fails on the class)."""
    for klass in type(module).__mro__:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def _same_code(fn, reference) -> bool:
    code, ref = getattr(fn, "__code__", None), reference.__code__
    return code is not None and all(
        getattr(code, a) == getattr(ref, a)
        for a in ("co_code", "co_names", "co_consts", "co_argcount", "co_kwonlyargcount"))


def is_chain(module: nn.Module) -> bool:
    """True when ``module``'s forward is known to be ``x -> child_n(...child_1(x))``
    (False for TorchScript modules, whose compiled forward does not call Python children)."""
    if isinstance(module, torch.jit.ScriptModule):
        return False
    forward = _class_forward(module)
    # MySequential.forward is the seed's, token for token: a copy of the seed's class compiles
    # to the same bytecode (fastlayers.tour.seed.MySequential does; tests check it).
    return forward is nn.Sequential.forward or forward is MySequential.forward or \
        _same_code(forward, MySequential.forward)


def _hooks(module: nn.Module) -> List[str]:
    """The kinds of hooks ``module`` carries, apart from the two a lazy module registers for
    its own materialisation."""
    own = {getattr(module, h).id for h in ("_initialize_hook", "_load_hook")
           if isinstance(module, LazyModuleMixin) and hasattr(module, h)}
    kinds = []
    for attr, kind in _HOOKS.items():
        if any(key not in own for key in getattr(module, attr, {})):
            if attr == "_backward_hooks" and getattr(module, "_is_full_backward_hook", None):
                kind = "full backward hook"
            kinds.append(kind)
    return kinds


def _global_hooks() -> List[str]:
    return [kind for attr, kind in _GLOBAL_HOOKS.items() if getattr(_torch_module, attr, None)]


def _left_behind(module: nn.Module, keep=()) -> List[str]:
    """What replacing ``module`` would lose: a forward set on the instance, or parameters,
    buffers and submodules other than those named in ``keep`` (moved to the new layer)."""
    lost = ["a forward set on the instance"] if "forward" in vars(module) else []
    extra = [n for n in module._parameters if n not in keep] + list(module._buffers) + \
        list(module._modules)
    if extra:
        lost.append(f"state the new layer would drop ({', '.join(extra)})")
    return lost


def _lazy(module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _moved(src: nn.Module, dst: nn.Module) -> nn.Module:
    """``dst`` holding ``src``'s weight and bias Parameter objects and training flag."""
    dst.weight = src.weight
    dst.bias = src.bias
    dst.train(src.training)
    return dst


def _fused(linear: nn.Linear) -> nn.Module:
    bias = linear.bias is not None
    if _lazy(linear):
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        return LazyLinearReLU(linear.out_features, bias, **factory).train(linear.training)
    out_f, in_f = linear.weight.shape  # a loaded, not yet called lazy layer says in=0
    return _moved(linear, LinearReLU(in_f, out_f, bias, device="meta",
                                     dtype=linear.weight.dtype))


def _unfused(layer: LinearReLU) -> nn.Module:
    bias = layer.bias is not None
    if _lazy(layer):
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        return nn.LazyLinear(layer.out_features, bias, **factory).train(layer.training)
    out_f, in_f = layer.weight.shape
    return _moved(layer, nn.Linear(in_f, out_f, bias, device="meta", dtype=layer.weight.dtype))


def _identity_for(relu: nn.ReLU) -> nn.Module:
    identity = nn.Identity().train(relu.training)
    identity.__dict__[_RELU_KEY] = relu  # for unfuse
    return identity


def _relu_for(identity: nn.Identity) -> nn.Module:
    relu = identity.__dict__.get(_RELU_KEY)
    return (nn.ReLU() if relu is None else relu).train(identity.training)


# Rules: (verb, first child's exact types, second child's exact type, build the first,
# build the second from the old second)
_FUSE = ("fuse", (nn.Linear, nn.LazyLinear), nn.ReLU, _fused, _identity_for)
_UNFUSE = ("unfuse", (LinearReLU, LazyLinearReLU), nn.Identity, _unfused, _relu_for)


def _rewrite(model: nn.Module, rule: Tuple, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    verb, first_types, second_type, build_first, build_second = rule
    names = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    global_hooks = _global_hooks()
    skipped: List[Tuple[str, str]] = []
    built: Dict[int, nn.Module] = {}  # one replacement per shared module: ties survive
    for path, container in list(model.named_modules()):
        if not is_chain(container):
            continue
        children = list(container._modules.items())
        i = 0
        while i < len(children) - 1:
            (name_a, a), (name_b, b) = children[i], children[i + 1]
            if not (type(a) in first_types and type(b) is second_type
                    and not (_lazy(a) and names[id(a)] > 1)):
                i += 1
                continue
            reasons = [(f"{path}.{name}" if path else name, f"{_kind(m)} carries a {kind}")
                       for name, m in ((name_a, a), (name_b, b)) for kind in _hooks(m)]
            reasons += [(f"{path}.{name}" if path else name, f"{_kind(m)} holds {what}")
                        for name, m, keep in ((name_a, a, ("weight", "bias")), (name_b, b, ()))
                        for what in _left_behind(m, keep)]
            if reasons or global_hooks:
                skipped += reasons or [(f"{path}.{name_a}" if path else name_a,
                                        f"{', '.join(global_hooks)} registered")]
                i += 1
                continue
            if id(a) not in built:
                built[id(a)] = build_first(a)
            container._modules[name_a] = built[id(a)]
            container._modules[name_b] = build_second(b)
            i += 2
    if skipped:
        skipped = list(dict.fromkeys(skipped))
        pairs = "Linear+ReLU pairs left unfused" if verb == "fuse" else \
            "LinearReLU+Identity pairs left fused"
        listing = "; ".join(f"{p!r}: {why}" for p, why in skipped)
        warnings.warn(SkippedFusionWarning(
            f"{verb}(): {pairs} because the rewrite would change what they do (hooks would "
            f"see other values or not run at all; other state would be dropped or bypassed): "
            f"{listing}. Remove the hooks before {verb}() (or register "
            f"them afterwards) to rewrite these too.", skipped), stacklevel=3)
    return model


def _kind(module: nn.Module) -> str:
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every ``nn.Linear`` + ``nn.ReLU`` pair in a chain container replaced by
    ``LinearReLU`` + ``nn.Identity`` (rule in the module docstring).

    model: any nn.Module (nothing to fuse is fine). inplace: rewrite ``model`` itself
    instead of a deep copy. Returns the rewritten model; its outputs equal the original's
    (bitwise on the torch path; within fp32 rounding through the Triton kernels). The fused
    slot (``net[i]``) returns post-ReLU values. Pairs left alone because of hooks are named
    in one :class:`SkippedFusionWarning`.
    """
    return _rewrite(model, _FUSE, inplace)


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The reverse of :func:`fuse`: every ``LinearReLU`` + ``nn.Identity`` pair in a chain
    container becomes ``nn.Linear`` + ``nn.ReLU`` holding the same Parameters; the ReLU is
    the one fuse() replaced (``inplace`` and all), else a new ``nn.ReLU()``. A
    ``LinearReLU`` not followed by ``nn.Identity`` is left as it is (splitting it would
    shift indices and state_dict keys); hooked pairs too, with a :class:`SkippedFusionWarning`."""
    return _rewrite(model, _UNFUSE, inplace)
