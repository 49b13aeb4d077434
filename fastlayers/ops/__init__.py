"""torch.library custom ops (namespace ``fastlayers``) and the autograd Functions over them.

Importing this package registers every op. Pattern, one file per op:

* ``fastlayers::<op>_fwd`` / ``..._bwd*``: ``torch.library.custom_op`` with ``register_fake``;
  the implementation runs the Triton launcher from ``fastlayers.kernels`` when
  :func:`fastlayers._backend.use_triton` says so, else the torch reference.
* ``<Op>Function``: a ``torch.autograd.Function`` calling the forward and backward ops.
* In plain eager mode the implementations are called directly (:func:`call`), skipping
  the dispatcher round trip; under torch.compile, export or any dispatch mode (fake
  tensors, functionalization) the registered ops are called, so tracing sees them.
"""
from ._dispatch import call, eager, needs_grad  # noqa: F401
from . import linear_relu  # noqa: F401
from . import fixed_hidden, fixed_hidden_mlp, halve_until  # noqa: F401
from . import centered  # noqa: F401
