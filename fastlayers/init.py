"""Initialise every linear-like layer of a model in one call (the seed's ``init_normal`` etc.).

Each function takes a model or a single module, initialises the weight of every linear-like
layer inside it with the ``torch.nn.init`` function of the same name, handles its bias as
``bias=`` says, and returns the model::

    fastlayers.init.normal_(net, std=0.01)      # == net.apply(init_normal) in the seed
    fastlayers.init.constant_(net, 1)           # == net.apply(init_constant)
    fastlayers.init.xavier_uniform_(net[0], bias="keep")
    fastlayers.init.apply(net, my_init)         # like net.apply, linear-like layers only

Linear-like layers: ``nn.Linear`` (and subclasses, so a materialised ``nn.LazyLinear``),
``LinearReLU`` (and a materialised ``LazyLinearReLU``), ``MyLinear``, and hence the
``nn.Linear`` inside ``FixedHiddenMLP``. Only their ``weight`` and ``bias`` parameters are
touched: fixed weights (``FixedHiddenMatmul.weight``, ``FixedHiddenMLP.rand_weight``) are
buffers and never change. A parameter with ``requires_grad=False`` is still initialised,
as ``torch.nn.init`` would.

Order: layers are visited exactly as ``model.apply`` visits modules (children before
parents, a module shared inside one container once), weight before bias, so under the
same seed the random numbers drawn equal the seed's ``net.apply(init_fn)``.

Uninitialised lazy layers (``nn.LazyLinear``, ``LazyLinearReLU`` before their first
forward) have no shape yet: they are skipped with a warning naming them; run one forward
pass first (the seed does ``net(X)`` before initialising).

``MyLinear`` stores its weight as ``[in_units, units]`` (the transpose of nn.Linear's
``[out, in]``). It is initialised exactly as ``nn.Linear(in_units, units)``'s weight would
be and stored transposed, so fan_in = in_units and fan_out = units for the xavier and
kaiming rules, and ``orthogonal_`` / ``sparse_`` act on the same matrix as for nn.Linear.

``bias=``: ``"zero"`` (default, as the seed's ``init_normal`` / ``init_constant``),
``"keep"`` (leave biases as they are, as the seed's ``init_xavier``), or a number (fill
every bias with it). Layers without a bias are fine with any choice.

``generator=``: an optional ``torch.Generator`` for the random draws (as in torch.nn.init).
"""
import warnings
from typing import Callable, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import LinearReLU, MyLinear

Bias = Union[str, float]

__all__ = ["normal_", "constant_", "zeros_", "ones_", "uniform_", "xavier_uniform_",
           "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
           "apply", "is_linear_like"]


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear, LinearReLU and MyLinear (subclasses included), lazy or not."""
    return isinstance(module, (nn.Linear, LinearReLU, MyLinear))


def _uninitialised(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def apply(model: nn.Module, fn: Callable[[nn.Module], None]) -> nn.Module:
    """``model.apply(fn)``, but ``fn`` is called only on the initialised linear-like layers
    (see the module docstring); returns ``model``. ``fn`` receives the layer itself, so
    ``MyLinear`` layers arrive with their ``[in_units, units]`` weight."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlayers.init: expected an nn.Module, got {type(model).__name__}")
    lazy = [name or "(the model itself)" for name, m in model.named_modules()
            if is_linear_like(m) and _uninitialised(m)]
    if lazy:
        warnings.warn(
            f"fastlayers.init: skipped {len(lazy)} uninitialised lazy layer(s) "
            f"({', '.join(lazy)}); run one forward pass (e.g. net(X)) first so their shapes "
            f"are known, then initialise", stacklevel=3)
    return model.apply(lambda m: fn(m) if is_linear_like(m) and not _uninitialised(m) else None)


def _check_bias(bias: Bias) -> None:
    ok = bias in ("zero", "keep") if isinstance(bias, str) else \
        isinstance(bias, (int, float)) and not isinstance(bias, bool)
    if not ok:
        raise ValueError(f"fastlayers.init: bias must be 'zero', 'keep' or a number, got {bias!r}")


def _initialise(model: nn.Module, fill: Callable[[torch.Tensor], object], bias: Bias) -> nn.Module:
    """Run ``fill`` on each linear-like weight (as an [out, in] matrix), then set the bias."""
    _check_bias(bias)

    def init_layer(module):
        weight = module.weight
        if isinstance(module, MyLinear):  # [in, out]: fill nn.Linear's layout, store transposed
            out_in = torch.empty(weight.shape[::-1], dtype=weight.dtype, device=weight.device)
            fill(out_in)
            with torch.no_grad():
                weight.copy_(out_in.t())
        else:
            fill(weight)
        if module.bias is not None and bias != "keep":
            if bias == "zero":
                nn.init.zeros_(module.bias)
            else:
                nn.init.constant_(module.bias, bias)

    return apply(model, init_layer)


def _gen(generator):
    """Pass ``generator`` on only when given (keeps the plain torch calls exact)."""
    return {} if generator is None else {"generator": generator}


def normal_(model: nn.Module, mean: float = 0.0, std: float = 1.0, *, bias: Bias = "zero",
            generator=None) -> nn.Module:
    """Weights ~ N(mean, std**2) (``nn.init.normal_``). The seed's ``init_normal`` is
    ``normal_(net, std=0.01)``."""
    return _initialise(model, lambda w: nn.init.normal_(w, mean, std, **_gen(generator)), bias)


def uniform_(model: nn.Module, a: float = 0.0, b: float = 1.0, *, bias: Bias = "zero",
             generator=None) -> nn.Module:
    """Weights ~ U(a, b) (``nn.init.uniform_``)."""
    return _initialise(model, lambda w: nn.init.uniform_(w, a, b, **_gen(generator)), bias)


def constant_(model: nn.Module, val: float, *, bias: Bias = "zero") -> nn.Module:
    """Weights = ``val`` (``nn.init.constant_``). The seed's ``init_constant`` is
    ``constant_(net, 1)``; its ``init_42`` is ``constant_(net, 42, bias="keep")``."""
    return _initialise(model, lambda w: nn.init.constant_(w, val), bias)


def zeros_(model: nn.Module, *, bias: Bias = "zero") -> nn.Module:
    """Weights = 0 (``nn.init.zeros_``)."""
    return _initialise(model, nn.init.zeros_, bias)


def ones_(model: nn.Module, *, bias: Bias = "zero") -> nn.Module:
    """Weights = 1 (``nn.init.ones_``)."""
    return _initialise(model, nn.init.ones_, bias)


def xavier_uniform_(model: nn.Module, gain: float = 1.0, *, bias: Bias = "zero",
                    generator=None) -> nn.Module:
    """Glorot uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)). The seed's
    ``init_xavier`` is ``xavier_uniform_(net, bias="keep")``."""
    return _initialise(
        model, lambda w: nn.init.xavier_uniform_(w, gain, **_gen(generator)), bias)


def xavier_normal_(model: nn.Module, gain: float = 1.0, *, bias: Bias = "zero",
                   generator=None) -> nn.Module:
    """Glorot normal: N(0, std**2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    return _initialise(
        model, lambda w: nn.init.xavier_normal_(w, gain, **_gen(generator)), bias)


def kaiming_uniform_(model: nn.Module, a: float = 0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu", *, bias: Bias = "zero",
                     generator=None) -> nn.Module:
    """He uniform: U(-bound, bound), bound = gain(nonlinearity, a) * sqrt(3 / fan_mode)."""
    return _initialise(model, lambda w: nn.init.kaiming_uniform_(
        w, a, mode, nonlinearity, **_gen(generator)), bias)


def kaiming_normal_(model: nn.Module, a: float = 0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu", *, bias: Bias = "zero",
                    generator=None) -> nn.Module:
    """He normal: N(0, std**2), std = gain(nonlinearity, a) / sqrt(fan_mode)."""
    return _initialise(model, lambda w: nn.init.kaiming_normal_(
        w, a, mode, nonlinearity, **_gen(generator)), bias)


def orthogonal_(model: nn.Module, gain: float = 1.0, *, bias: Bias = "zero",
                generator=None) -> nn.Module:
    """A (semi-)orthogonal weight matrix scaled by ``gain`` (``nn.init.orthogonal_``)."""
    return _initialise(model, lambda w: nn.init.orthogonal_(w, gain, **_gen(generator)), bias)


def sparse_(model: nn.Module, sparsity: float, std: float = 0.01, *, bias: Bias = "zero",
            generator=None) -> nn.Module:
    """N(0, std**2) weights with a ``sparsity`` fraction of each input column (of the
    [out, in] matrix) zeroed (``nn.init.sparse_``)."""
    return _initialise(
        model, lambda w: nn.init.sparse_(w, sparsity, std, **_gen(generator)), bias)
