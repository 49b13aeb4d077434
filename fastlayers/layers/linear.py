"""Fused Linear+ReLU modules: LinearReLU (nn.Linear's parameters), LazyLinearReLU, MyLinear."""
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from ..functional import linear_relu
from .not_scriptable import NotScriptable

_MISSING = object()


class LinearReLU(NotScriptable, nn.Module):
    """``nn.Sequential(nn.Linear(in, out), nn.ReLU())`` as one fused op.

    Parameters, init, ``reset_parameters``, ``extra_repr`` and state_dict keys are exactly
    nn.Linear's (``weight [out, in]``, ``bias [out]``), so a state_dict moves strictly both
    ways. It is deliberately not an nn.Linear subclass: code that swaps or wraps every
    ``nn.Linear`` it finds would otherwise drop the ReLU silently.

    Args:
        in_features, out_features: sizes of each input and output sample.
        bias: learn an additive bias (default True). device, dtype: factory kwargs.
    Input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    reset_parameters = nn.Linear.reset_parameters
    extra_repr = nn.Linear.extra_repr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``self.weight`` goes through nn.Module.__getattr__ (Python: ~0.6 us each on a
        # 2-core CPU, the two ~1/9 of a 2x64x8 call). For this exact class with both
        # names registered as parameters, _parameters holds what the attributes return;
        # subclasses (torch.nn.utils.parametrize makes one) and anything that moves the
        # names out of _parameters (weight_norm/spectral_norm hooks, prune) read the
        # attributes.
        params = self._parameters
        weight = params.get("weight")
        bias = params.get("bias", _MISSING)
        if type(self) is not LinearReLU or weight is None or bias is _MISSING:
            weight, bias = self.weight, self.bias
        return linear_relu(x, weight, bias)


class LazyLinearReLU(LazyModuleMixin, LinearReLU):
    """A :class:`LinearReLU` whose ``in_features`` is inferred from the first input, like
    ``nn.LazyLinear`` (prints ``in_features=0`` until then; becomes a LinearReLU after).

    Args: out_features, bias, device, dtype as in :class:`LinearReLU`.
    """

    cls_to_become = LinearReLU
    weight: UninitializedParameter
    bias: UninitializedParameter

    def __init__(self, out_features: int, bias: bool = True, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(0, 0, False)
        self.weight = UninitializedParameter(**factory)
        self.out_features = out_features
        if bias:
            self.bias = UninitializedParameter(**factory)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.in_features != 0:
            LinearReLU.reset_parameters(self)

    def initialize_parameters(self, x: torch.Tensor) -> None:
        """Infer ``in_features`` from ``x.shape[-1]`` and initialise like nn.Linear (a
        weight loaded from a state_dict first is kept, and gives ``in_features``)."""
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.in_features = x.shape[-1]
                self.weight.materialize((self.out_features, self.in_features))
                if self.bias is not None:
                    self.bias.materialize((self.out_features,))
                self.reset_parameters()
        elif self.in_features == 0:  # materialised by load_state_dict: read it off the weight
            if x.shape[-1] != self.weight.shape[-1]:
                raise ValueError(f"LazyLinearReLU: input has {x.shape[-1]} features, the "
                                 f"loaded weight {list(self.weight.shape)} expects "
                                 f"{self.weight.shape[-1]}")
            self.in_features = self.weight.shape[-1]


class MyLinear(NotScriptable, nn.Module):
    """The seed's ``MyLinear``: ``relu(X @ weight + bias)`` with ``weight [in_units, units]``
    and ``bias [units]``, both ``randn``-initialised, fused into one kernel.

    Unlike the seed (which uses ``.data`` in forward and so blocks autograd), gradients
    reach ``weight`` and ``bias``.

    Under ``torch.autocast`` it casts as ``F.linear`` does and returns the autocast dtype;
    the seed's ``X @ W + b`` returns fp32 there when the bias is fp32.

    Args: in_units, units: input and output sizes. device, dtype: factory kwargs.
    """

    def __init__(self, in_units: int, units: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.randn(in_units, units, **factory))
        self.bias = nn.Parameter(torch.randn(units, **factory))

    def reset_parameters(self) -> None:
        """Draw weight and bias again from N(0, 1), as ``torch.randn`` did, in place: after
        ``to_empty()`` of a module built on the meta device, for one."""
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return linear_relu(X, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        return f"in_units={self.weight.shape[0]}, units={self.weight.shape[1]}"
