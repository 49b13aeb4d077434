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
``nn.ReLU``).

What is recognised with certainty, and so rewritten:

* A chain container is a module whose forward passes its input through its children in
  order and nothing else: a module whose class uses ``nn.Sequential.forward`` or
  ``fastlayers.MySequential.forward`` unchanged, or whose ``forward`` compiles to the same
  bytecode as the seed's ``MySequential.forward`` (``for module in self._modules.values():
  X = module(X)``; so a copy of the seed's class in your own code qualifies). Only there
  is a Linear's output known to reach nothing but the next child.
* Exact types only: subclasses of nn.Linear or nn.ReLU may override forward, so they are
  left alone; so is any layer carrying hooks (forward, backward or state_dict hooks:
  weight_norm, spectral_norm, ...), since the replacement would not run them.
* An uninitialised lazy layer reachable under more than one name is left alone (it could
  not materialise consistently in two places); initialised shared layers are fine.

Anything else (a custom forward such as the seed's ``MLP``, ``FixedHiddenMLP``'s linear used
twice, a ``LinearReLU`` that is not followed by an ``nn.Identity``) is left as it is: use
``fastlayers.LinearReLU`` in such code directly.
"""
import copy
from typing import Dict, Tuple

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import LazyLinearReLU, LinearReLU, MySequential

__all__ = ["fuse", "unfuse", "is_chain"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")


def _seed_mysequential_forward(self, X):  # the seed's MySequential.forward, verbatim
    for module in self._modules.values():
        X = module(X)
    return X


def _same_code(fn, reference) -> bool:
    code, ref = getattr(fn, "__code__", None), reference.__code__
    return code is not None and all(
        getattr(code, a) == getattr(ref, a)
        for a in ("co_code", "co_names", "co_consts", "co_argcount", "co_kwonlyargcount"))


def is_chain(module: nn.Module) -> bool:
    """True when ``module``'s forward is known to be ``x -> child_n(...child_1(x))``."""
    forward = type(module).forward
    return forward in (nn.Sequential.forward, MySequential.forward) or \
        _same_code(forward, _seed_mysequential_forward)


def _plain(module) -> bool:
    """No hooks, apart from the two a lazy module registers for its own materialisation."""
    own = {getattr(module, h).id for h in ("_initialize_hook", "_load_hook")
           if isinstance(module, LazyModuleMixin) and hasattr(module, h)}
    return not any(key not in own for h in _HOOKS for key in getattr(module, h, {}))


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
    return _moved(linear, LinearReLU(linear.in_features, linear.out_features, bias,
                                     device="meta", dtype=linear.weight.dtype))


def _unfused(layer: LinearReLU) -> nn.Module:
    bias = layer.bias is not None
    if _lazy(layer):
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        return nn.LazyLinear(layer.out_features, bias, **factory).train(layer.training)
    return _moved(layer, nn.Linear(layer.in_features, layer.out_features, bias,
                                   device="meta", dtype=layer.weight.dtype))


# Rules: (first child's exact types, second child's exact type, build the first, build the second)
_FUSE = ((nn.Linear, nn.LazyLinear), nn.ReLU, _fused, nn.Identity)
_UNFUSE = ((LinearReLU, LazyLinearReLU), nn.Identity, _unfused, nn.ReLU)


def _rewrite(model: nn.Module, rule: Tuple, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    first_types, second_type, build_first, build_second = rule
    names = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    built: Dict[int, nn.Module] = {}  # one replacement per shared module: ties survive
    for container in list(model.modules()):
        if not is_chain(container):
            continue
        children = list(container._modules.items())
        i = 0
        while i < len(children) - 1:
            (name_a, a), (name_b, b) = children[i], children[i + 1]
            if (type(a) in first_types and type(b) is second_type and _plain(a) and _plain(b)
                    and not (_lazy(a) and names[id(a)] > 1)):
                if id(a) not in built:
                    built[id(a)] = build_first(a)
                container._modules[name_a] = built[id(a)]
                container._modules[name_b] = build_second().train(b.training)
                i += 2
            else:
                i += 1
    return model


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every ``nn.Linear`` + ``nn.ReLU`` pair in a chain container replaced by
    ``LinearReLU`` + ``nn.Identity`` (rule in the module docstring).

    model: any nn.Module (nothing to fuse is fine). inplace: rewrite ``model`` itself
    instead of a deep copy. Returns the rewritten model; its outputs equal the original's
    (bitwise on the torch path; within fp32 rounding through the Triton kernels).
    """
    return _rewrite(model, _FUSE, inplace)


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The reverse of :func:`fuse`: every ``LinearReLU`` + ``nn.Identity`` pair in a chain
    container becomes ``nn.Linear`` + ``nn.ReLU`` holding the same Parameters. A
    ``LinearReLU`` not followed by ``nn.Identity`` is left as it is (splitting it would
    shift indices and state_dict keys)."""
    return _rewrite(model, _UNFUSE, inplace)
