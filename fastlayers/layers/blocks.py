"""The seed's blocks ("Builders' Guide") as drop-ins: FixedHiddenMatmul, FixedHiddenMLP,
NestMLP and MySequential, with the seed's state_dict keys and init order."""
import operator

import torch
from torch import nn

from .._validate import check_python_float, check_threshold
from ..functional import fixed_hidden, fixed_hidden_mlp
from .linear import LinearReLU
from .not_scriptable import NotScriptable


class FixedHiddenMatmul(NotScriptable, nn.Module):
    """relu(x @ weight + c) with a frozen weight, one fused kernel (the seed's
    ``F.relu(torch.mm(X, self.rand_weight) + 1)``).

    The weight is a registered buffer ``weight [in_features, out_features]``: ``.to()``
    moves it, ``state_dict()`` saves it, no optimizer sees it.

    Args:
        in_features, out_features: sizes of each input and output sample.
        c: the constant added before the ReLU (default 1.0, as in the seed).
        weight: an optional tensor [in_features, out_features] to use (copied, detached);
            default ``torch.rand`` like the seed. device, dtype: factory kwargs.
    Input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, c: float = 1.0, weight=None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if weight is None:
            weight = torch.rand((in_features, out_features), **factory)
        else:
            if tuple(weight.shape) != (in_features, out_features):
                raise ValueError(f"FixedHiddenMatmul: weight must have shape ({in_features}, "
                                 f"{out_features}), got {tuple(weight.shape)}")
            weight = weight.detach().clone().to(**{k: v for k, v in factory.items() if v})
        c = check_python_float("FixedHiddenMatmul", "c", c)
        self.in_features, self.out_features, self.c = in_features, out_features, c
        self.register_buffer("weight", weight)

    def reset_parameters(self) -> None:
        """Draw the weight again as the default does (``torch.rand``: uniform on [0, 1)), in
        place: after ``to_empty()`` of a module built on the meta device, for one."""
        with torch.no_grad():
            self.weight.uniform_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fixed_hidden(x, self.weight, self.c)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, c={self.c}"


class FixedHiddenMLP(NotScriptable, nn.Module):
    """The seed's FixedHiddenMLP, sync-free:

        X = linear(X); X = relu(X @ rand_weight + 1); X = linear(X)   # one Linear, twice
        while X.abs().sum() > 1: X /= 2                                # -> X * 2**-k, no sync
        return X            (reduce=None)      or      X.sum()   (reduce='sum', the book's)

    Structure and init order are the seed's: ``rand_weight = torch.rand(d, d)`` first, then
    ``linear = nn.Linear(d, d)``, so the same RNG seed gives the same tensors, and the
    state_dict keys are ``linear.weight``, ``linear.bias`` plus the buffer ``rand_weight``.

    Loading a state_dict saved from the seed's module (which has no ``rand_weight``: the
    seed keeps it as a plain attribute) works with ``strict=True`` too: a missing
    ``rand_weight`` is kept as it is, since the seed's tensor is not in its state_dict.
    To carry the seed's tensor over use :meth:`from_seed` or
    ``load_state_dict({**seed.state_dict(), "rand_weight": seed.rand_weight})``.
    (The seed loads ours with ``strict=False``, or after dropping the ``rand_weight`` key.)

    Args:
        d: feature size (the seed's 20). reduce: None or 'sum'. c: the constant before the
            ReLU (1.0). threshold: the loop's bound (1.0). device, dtype: factory kwargs.
    Input ``[..., d]`` -> output ``[..., d]`` (reduce=None) or a 0-dim tensor ('sum').
    Numerics and inf/NaN behaviour: see :func:`fastlayers.functional.halve_until`.
    """

    def __init__(self, d: int = 20, reduce=None, c: float = 1.0, threshold: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        if reduce not in (None, "sum"):
            raise ValueError(f"FixedHiddenMLP: reduce must be None or 'sum', got {reduce!r}")
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("rand_weight", torch.rand((d, d), **factory))
        self.linear = nn.Linear(d, d, **factory)
        c = check_python_float("FixedHiddenMLP", "c", c)
        threshold = check_threshold("FixedHiddenMLP", torch.float64, threshold)  # (dtype: at call)
        self.d, self.reduce, self.c, self.threshold = d, reduce, c, threshold

    def reset_parameters(self) -> None:
        """Draw ``rand_weight`` (``torch.rand``) and then ``linear`` (nn.Linear's init) again,
        in place and in the seed's order: after ``to_empty()`` of a module built on the meta
        device, for one."""
        with torch.no_grad():
            self.rand_weight.uniform_()
        self.linear.reset_parameters()

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return fixed_hidden_mlp(X, self.linear.weight, self.linear.bias, self.rand_weight,
                                self.c, self.threshold, self.reduce)

    def forward_with_count(self, X: torch.Tensor):
        """(output, k): k (int32 0-dim, on X's device) is the number of halvings, the
        seed's loop count; 2**31 - 1 when X's block output holds ±inf."""
        return fixed_hidden_mlp(X, self.linear.weight, self.linear.bias, self.rand_weight,
                                self.c, self.threshold, self.reduce, return_count=True)

    @classmethod
    def from_seed(cls, seed: nn.Module, reduce="seed's") -> "FixedHiddenMLP":
        """A FixedHiddenMLP holding copies of a seed module's ``linear`` and ``rand_weight``
        (on the seed's device and dtype) that returns what the seed returns. reduce: by
        default the seed's own (its ``reduce`` attribute; the book's module, which has none,
        returns ``X.sum()``: 'sum'), or None / 'sum'."""
        if reduce == "seed's":
            reduce = getattr(seed, "reduce", "sum")
        w = seed.linear.weight
        module = cls(w.shape[0], reduce=reduce, device=w.device, dtype=w.dtype)
        state = dict(seed.state_dict())
        state["rand_weight"] = seed.rand_weight.detach()
        module.load_state_dict(state, strict=True)
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "rand_weight" in missing_keys:  # a seed state_dict: keep ours
            missing_keys.remove(prefix + "rand_weight")

    def extra_repr(self) -> str:
        return f"d={self.d}, reduce={self.reduce!r}, c={self.c}, threshold={self.threshold}"


class NestMLP(NotScriptable, nn.Module):
    """The seed's NestMLP with fused Linear+ReLU layers and the seed's state_dict keys:

        net = Sequential(LinearReLU(20, 64), Identity(), LinearReLU(64, 32), Identity())
        linear = Linear(32, 16)

    The Identity slots keep the seed's indices (``net.0.*``, ``net.2.*``), and the init
    order is the seed's, so the same RNG seed gives the same weights and a state_dict
    moves strictly both ways. Args: the sizes (defaults: the seed's 20, 64, 32, 16) and
    device, dtype. Input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    def __init__(self, in_features: int = 20, hidden1: int = 64, hidden2: int = 32,
                 out_features: int = 16, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.net = nn.Sequential(LinearReLU(in_features, hidden1, **factory), nn.Identity(),
                                 LinearReLU(hidden1, hidden2, **factory), nn.Identity())
        self.linear = nn.Linear(hidden2, out_features, **factory)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.linear(self.net(X))


class MySequential(NotScriptable, nn.Module):
    """The seed's MySequential: children stored in ``_modules`` under "0", "1", ... and
    called in order. Also supports ``len``, iteration and indexing (an int, negative
    too, gives the child; a slice gives a MySequential of those children, under their
    keys, as ``nn.Sequential`` does)."""

    def __init__(self, *args: nn.Module):
        super().__init__()
        for idx, module in enumerate(args):
            if not isinstance(module, nn.Module):
                raise TypeError(f"MySequential: argument {idx} is a {type(module).__name__}, "
                                f"not an nn.Module")
            self._modules[str(idx)] = module

    def forward(self, X):
        for module in self._modules.values():
            X = module(X)
        return X

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # children keep their keys, as in nn.Sequential
            part = MySequential()
            part._modules.update(list(self._modules.items())[idx])
            return part
        try:
            idx = operator.index(idx)
        except TypeError:
            raise TypeError(f"MySequential: indices must be integers or slices, not "
                            f"{type(idx).__name__}") from None
        modules = list(self._modules.values())
        if not -len(modules) <= idx < len(modules):
            raise IndexError(f"MySequential: index {idx} is out of range for "
                             f"{len(modules)} modules")
        return modules[idx]

    def __dir__(self):
        return [k for k in super().__dir__() if not k.isdigit()]


__all__ = ["FixedHiddenMatmul", "FixedHiddenMLP", "NestMLP", "MySequential"]
