"""CenteredLayer: x - x.mean(), fused (one launch while the tensor fits on chip)."""
from torch import nn

from ..functional import centered
from ..ops.centered import normalize_dims
from .not_scriptable import NotScriptable


class CenteredLayer(NotScriptable, nn.Module):
    """The seed's ``CenteredLayer`` (``X - X.mean()``), as a fused kernel; no parameters.

    Args:
        dim: None (default: subtract the mean of all elements, as the seed does), an int or
            a tuple of ints (subtract the mean over those dims, keepdim; e.g. ``dim=-1``
            centers each row).
    Input: any shape, floating point. Output: same shape and dtype. See
    :func:`fastlayers.functional.centered` for the numerics.
    """

    def __init__(self, dim=None):
        super().__init__()
        if dim is not None:  # a bad dim fails here, not at the first forward
            normalize_dims("CenteredLayer", 64, dim)
        self.dim = tuple(dim) if isinstance(dim, (list, tuple)) else dim

    def forward(self, X):
        return centered(X, self.dim)

    def extra_repr(self) -> str:
        return "" if self.dim is None else f"dim={self.dim}"
