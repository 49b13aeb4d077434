"""Tensor parallel (fastlayers.parallel): 2 CPU processes (gloo) shard LinearReLU and MyLinear
with ColwiseParallel / RowwiseParallel through torch's parallelize_module; outputs and
gradients equal the single-process model's, on the torch path and the Triton kernels
(interpreter). Invalid combinations are refused with a clear error."""

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Partial, Replicate, Shard

import fastlayers
from fastlayers import _backend
from fastlayers.parallel import ColwiseParallel, RowwiseParallel

from _distributed import WORLD, gloo_group, run_ranks, save_rank

BACKENDS = ["torch"] + (["triton"] if _backend.interpreting() else [])


def _models():
    """(model, plan, input) cases, built identically in every process (fixed seed). Odd
    sizes give uneven shards (torch.chunk: 8 and 7 of 15)."""
    torch.manual_seed(1234)
    a = nn.Sequential(fastlayers.LinearReLU(13, 15), fastlayers.MyLinear(15, 6), nn.Linear(6, 3))
    plan_a = {"0": ColwiseParallel(), "1": RowwiseParallel()}
    b = nn.Sequential(fastlayers.MyLinear(13, 10), fastlayers.LinearReLU(10, 7),
                      nn.Linear(7, 4), fastlayers.LinearReLU(4, 5))
    plan_b = {"0": ColwiseParallel(), "1": RowwiseParallel(),
              "2": ColwiseParallel(), "3": RowwiseParallel()}  # torch's style for nn.Linear
    c = nn.Sequential(fastlayers.LinearReLU(13, 9))
    plan_c = {"0": ColwiseParallel(output_layouts=Replicate())}
    d = nn.Sequential(fastlayers.LinearReLU(13, 8, bias=False), fastlayers.LinearReLU(8, 6))
    plan_d = {"0": ColwiseParallel(), "1": RowwiseParallel(output_layouts=Shard(0),
                                                              use_local_output=False)}
    # a trainable layer in front of a Colwise one: its gradients need the input gradient
    # summed over the ranks (each holds the part from its own output features)
    e = nn.Sequential(nn.Linear(13, 11), fastlayers.LinearReLU(11, 9), fastlayers.MyLinear(9, 5))
    plan_e = {"1": ColwiseParallel(), "2": RowwiseParallel()}
    x = torch.randn(4, 3, 13)
    return [(a, plan_a, x), (b, plan_b, x), (c, plan_c, x[0]), (d, plan_d, x.reshape(12, 13)),
            (e, plan_e, x)]


def _run(model, x):
    """Output and the full gradient of every parameter and of the input after a
    random-weighted loss."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    if hasattr(out, "full_tensor"):  # a DTensor output (use_local_output=False)
        assert out.placements == (Shard(0),)
        out = out.full_tensor()  # differentiable all-gather
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * g).sum().backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for p in model.parameters()]
    return out.detach(), [gr.detach() for gr in grads + [x.grad]]


def _worker(rank, init_method, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    with gloo_group(rank, init_method):
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for backend in BACKENDS:
            with fastlayers.use_backend(backend):
                results[backend] = []
                for model, plan, x in _models():
                    parallelize_module(model, mesh, plan)
                    out, grads = _run(model, x)
                    shard = next(type(m.weight).__name__ for m in model if isinstance(
                        m, (fastlayers.LinearReLU, fastlayers.MyLinear)))
                    results[backend].append((out, grads, shard))
        save_rank(results, out_dir, rank)


@pytest.mark.slow
def test_tensor_parallel_matches_single_process(tmp_path):
    ranks = run_ranks(_worker, tmp_path)
    for backend in BACKENDS:
        with fastlayers.use_backend(backend):
            cases = _models()
        for i, (model, _plan, x) in enumerate(cases):
            with torch.no_grad():  # independent float64 oracle of the forward
                want64 = model.double()(x.double())
            model.float()
            with fastlayers.use_backend(backend):
                want, want_grads = _run(model, x)
            torch.testing.assert_close(want.double(), want64, rtol=1e-5, atol=1e-5)
            for rank in range(WORLD):
                out, grads, shard = ranks[rank][backend][i]
                assert shard == "DTensor"  # the fastlayers layer really was sharded
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6,
                                           msg=f"{backend} case {i} rank {rank}")
                assert len(grads) == len(want_grads)
                for g, w in zip(grads, want_grads):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5,
                                               msg=f"{backend} case {i} rank {rank} grad")


@pytest.mark.parametrize("module", [fastlayers.LinearReLU(4, 6), fastlayers.MyLinear(4, 6)])
def test_rowwise_partial_output_is_refused(module):
    with pytest.raises(ValueError, match="relu of a partial sum|relu\\(sum of partials\\)"):
        RowwiseParallel(output_layouts=Partial())._apply(module, None)


@pytest.mark.parametrize("style", [ColwiseParallel, RowwiseParallel])
@pytest.mark.parametrize("module", [fastlayers.CenteredLayer(), fastlayers.FixedHiddenMatmul(4, 4),
                                    fastlayers.FixedHiddenMLP(4), nn.ReLU()])
def test_other_modules_are_refused(style, module):
    with pytest.raises(TypeError, match="supports fastlayers.LinearReLU"):
        style()._apply(module, None)
