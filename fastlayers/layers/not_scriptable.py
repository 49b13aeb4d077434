"""The modules' clear refusal of ``torch.jit.script``: their forwards are Python (input
checks, the path choice, Triton launches) that TorchScript cannot compile, and without this
it fails deep inside its compiler with a message about the code, not the module."""


class NotScriptable:
    """Mixin for an nn.Module: ``torch.jit.script`` (of it, or of a model holding it)
    raises a RuntimeError naming the module and what to use instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fastlayers.{type(self).__name__} does not support torch.jit.script (its "
            f"forward is Python TorchScript cannot compile); use torch.jit.trace, "
            f"torch.export or torch.compile instead")
