"""fastlayers: fused Triton layers behind drop-in nn.Modules, with a torch fallback.

    import fastlayers
    layer = fastlayers.LinearReLU(20, 256)   # nn.Linear + nn.ReLU, one fused kernel
    fastlayers.backend_info()                # which path each device takes, and why
"""
from . import functional, ops  # noqa: F401  (ops: registers the custom ops)
from . import flops  # noqa: F401  (FLOP formulas of the custom ops for FlopCounterMode)
from ._backend import backend_info, get_backend, set_backend, use_backend  # noqa: F401
from .layers import LazyLinearReLU, LinearReLU, MyLinear  # noqa: F401
from .layers import FixedHiddenMatmul, FixedHiddenMLP, MySequential, NestMLP  # noqa: F401
from . import device, init, io, params, settings  # noqa: F401  (helpers, as attributes)
from .convert import SkippedFusionWarning, fuse, unfuse  # noqa: F401
from .layers import CenteredLayer  # noqa: F401
from .compile_backend import explain  # noqa: F401  (torch.compile(m, backend="fastlayers"))

__version__ = "0.1.0"

__all__ = [
    "LinearReLU", "LazyLinearReLU", "MyLinear",
    "FixedHiddenMatmul", "FixedHiddenMLP", "NestMLP", "MySequential",
    "CenteredLayer",
    "fuse", "unfuse", "SkippedFusionWarning", "params", "init", "io", "device",
    "functional", "settings", "backend_info", "get_backend", "set_backend", "use_backend",
]
