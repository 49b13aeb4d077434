"""Pure Triton kernels and their launchers (installed as ``fastlayers.kernels``).

Every launcher takes torch tensors and returns torch tensors. This package imports
only ``torch`` and ``triton``; it never imports ``fastlayers`` itself. Kernels run on
CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported).
"""
from .runtime import interpreting  # noqa: F401
