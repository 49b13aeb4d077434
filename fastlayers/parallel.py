"""Tensor parallel styles for fastlayers modules: torch's ColwiseParallel / RowwiseParallel,
extended to :class:`~fastlayers.LinearReLU` and :class:`~fastlayers.MyLinear`.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from fastlayers.parallel import ColwiseParallel, RowwiseParallel

    mesh = init_device_mesh("cuda", (world_size,))
    model = nn.Sequential(fastlayers.LinearReLU(512, 2048), fastlayers.MyLinear(2048, 512))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})

nn.Linear and nn.Embedding are handed to torch's own styles unchanged, so one plan can mix
them. Parameters become DTensors (state_dict, optimizers and checkpointing see them as
they see torch's sharded Linears); the fused ops run on the LOCAL shards (``to_local()``,
differentiable), so both paths (Triton kernels and the torch fallback) run unchanged and
no sharding rule for the custom ops is needed.

Which combinations are exact (relu is elementwise but not additive):

* ColwiseParallel: each rank owns output features, computes relu(x @ W_r.T + b_r) fused
  on the replicated input; output Shard(-1) (default) or any layout redistributed AFTER
  the ReLU (e.g. output_layouts=Replicate()): exact.
* RowwiseParallel: each rank owns input features and holds a partial sum x_r @ W_r.T; the
  ReLU is only valid on the full sum, so the partial matmul runs unfused, the sum is
  all-reduced (output Replicate, the default) or reduce-scattered (Shard(d)), and THEN
  bias and ReLU are applied. output_layouts=Partial() is refused (relu of a partial sum
  is not the partial of relu); so is any other fastlayers module (a clear TypeError).
Meshes must be 1-D, as for torch's styles. Uneven shards (sizes not divisible by the mesh
size) follow torch.chunk, as DTensor does.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel as _TorchColwise
from torch.distributed.tensor.parallel import RowwiseParallel as _TorchRowwise

from . import functional as FL
from .layers import LinearReLU, MyLinear

__all__ = ["ColwiseParallel", "RowwiseParallel"]

_SUPPORTED = "fastlayers.LinearReLU, fastlayers.MyLinear, nn.Linear and nn.Embedding"


def _check(style: str, module: nn.Module, device_mesh) -> None:
    if not isinstance(module, (LinearReLU, MyLinear)):
        raise TypeError(f"fastlayers.parallel.{style} supports {_SUPPORTED}; got "
                        f"{type(module).__name__} (shard its inner Linears instead, or keep it "
                        f"replicated)")
    if device_mesh is not None and device_mesh.ndim != 1:
        raise ValueError(f"fastlayers.parallel.{style} needs a 1-D device mesh, got "
                         f"{device_mesh.ndim}-D")


def _shard_params(module: nn.Module, mesh, weight_dim: int, bias_placement) -> None:
    """Replace weight/bias by DTensor Parameters: weight Shard(weight_dim), bias as given."""
    w = nn.Parameter(distribute_tensor(module.weight, mesh, [Shard(weight_dim)]),
                     requires_grad=module.weight.requires_grad)
    module.register_parameter("weight", w)
    if module.bias is not None:
        b = nn.Parameter(distribute_tensor(module.bias, mesh, [bias_placement]),
                         requires_grad=module.bias.requires_grad)
        module.register_parameter("bias", b)


def _local(t):
    return None if t is None else t.to_local()


def _out_features(module) -> int:
    return module.weight.shape[0] if isinstance(module, LinearReLU) else module.weight.shape[1]


def _as_dtensor(local: torch.Tensor, mesh, placement, global_shape) -> DTensor:
    shape = torch.Size(global_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=shape,
                              stride=stride)


def _colwise_forward(module, x: DTensor) -> DTensor:
    """relu(x @ W_r.T + b_r) on this rank's output features, fused; x is Replicate."""
    # x is whole on every rank, but each rank's dx covers its own output features: a
    # partial sum that x's gradient must add up over the ranks (Partial, not Replicate)
    x_local = x.to_local(grad_placements=[Partial()])
    w, b = module.weight.to_local(), _local(module.bias)
    y = FL.linear_relu(x_local, w if isinstance(module, LinearReLU) else w.t(), b)
    return _as_dtensor(y, x.device_mesh, Shard(y.dim() - 1),
                       (*x.shape[:-1], _out_features(module)))


def _rowwise_forward(module, output_layout, x: DTensor) -> DTensor:
    """Partial sums x_r @ W_r.T (unfused), reduced to ``output_layout``, then relu(. + b)."""
    x_local, w = x.to_local(), module.weight.to_local()
    partial_sum = F.linear(x_local, w) if isinstance(module, LinearReLU) else x_local @ w
    y = _as_dtensor(partial_sum, x.device_mesh, Partial(),
                    (*x.shape[:-1], _out_features(module)))
    y = y.redistribute(placements=[output_layout])
    if module.bias is not None:
        y = y + module.bias
    return torch.relu(y)


class ColwiseParallel(_TorchColwise):
    """torch's ColwiseParallel, also for LinearReLU (weight [out, in]: Shard(0)) and
    MyLinear (weight [in, out]: Shard(1)); bias Shard(0). Arguments as torch's:
    input_layouts (default Replicate()), output_layouts (default Shard(-1)),
    use_local_output (default True)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return super()._apply(module, device_mesh)
        _check("ColwiseParallel", module, device_mesh)

        def partition(name, mod, mesh):
            _shard_params(mod, mesh, 0 if isinstance(mod, LinearReLU) else 1, Shard(0))

        module.forward = partial(_colwise_forward, module)
        return distribute_module(
            module, device_mesh, partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class RowwiseParallel(_TorchRowwise):
    """torch's RowwiseParallel, also for LinearReLU (weight Shard(1)) and MyLinear (weight
    Shard(0)); bias Replicate, added with the ReLU after the reduction (see the module
    docstring: output_layouts=Partial() is refused). Arguments as torch's: input_layouts
    (default Shard(-1)), output_layouts (default Replicate()), use_local_output."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return super()._apply(module, device_mesh)
        _check("RowwiseParallel", module, device_mesh)
        (output_layout,) = self.output_layouts
        if isinstance(output_layout, Partial):
            raise ValueError(
                f"fastlayers.parallel.RowwiseParallel: output_layouts=Partial() is not valid "
                f"for {type(module).__name__}: each rank holds a partial sum x_r @ W_r.T, and "
                f"relu(sum of partials) is not the sum of relu(partials). Use Replicate() "
                f"(all-reduce) or Shard(d) (reduce-scatter): the ReLU then runs after the "
                f"reduction.")

        def partition(name, mod, mesh):
            _shard_params(mod, mesh, 1 if isinstance(mod, LinearReLU) else 0, Replicate())

        self.desired_input_layouts = (Shard(-1),)  # each rank takes its input features
        module.forward = partial(_rowwise_forward, module, output_layout)
        return distribute_module(
            module, device_mesh, partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))
