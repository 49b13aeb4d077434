"""The nn.Modules users import (re-exported from ``fastlayers``)."""
from .linear import LazyLinearReLU, LinearReLU, MyLinear  # noqa: F401
from .blocks import FixedHiddenMatmul, FixedHiddenMLP, MySequential, NestMLP  # noqa: F401
from .centered import CenteredLayer  # noqa: F401
