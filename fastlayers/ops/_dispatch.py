"""How an op is invoked: the registered custom op when tracing, its implementation in eager."""
import torch

_dispatch_modes = torch._C._len_torch_dispatch_stack


def eager() -> bool:
    """True in plain eager mode: not compiling/exporting and no dispatch mode active."""
    return not torch.compiler.is_compiling() and _dispatch_modes() == 0


def call(op, impl, *args):
    """Run ``op(*args)`` with the least host overhead that keeps tracing correct.

    op: the registered ``torch.library.custom_op``; impl: the Python function registered as
    its implementation. Both compute the same thing; ``impl`` skips the dispatcher.
    """
    return impl(*args) if eager() else op(*args)


def needs_grad(*tensors) -> bool:
    """True when autograd must record: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
