"""DistributedDataParallel over fused layers: 2 CPU processes (gloo), each training on half of
the batch, must produce the gradients and weights of single-process training on the full
batch, through the torch path and (where Triton's interpreter runs kernels on CPU tensors)
through the Triton kernels."""
import pytest
import torch
from torch import nn

import fastlayers
from fastlayers import _backend

from _distributed import WORLD, gloo_group, run_ranks, save_rank

BATCH = 10  # 5 rows per rank
STEPS = 4
# CPU processes: the Triton path needs the interpreter (TRITON_INTERPRET=1, set by conftest on
# machines without CUDA; the spawned processes inherit it).
BACKENDS = ["torch"] + (["triton"] if _backend.interpreting() else [])


def _model_and_data():
    """The same fused model and data in every process (fixed seed)."""
    torch.manual_seed(1234)
    model = nn.Sequential(fastlayers.LinearReLU(13, 37), fastlayers.LinearReLU(37, 17),
                          fastlayers.MyLinear(17, 5), nn.Linear(5, 3))
    X = torch.randn(BATCH, 13)
    Y = torch.randn(BATCH, 3)
    return model, X, Y


def _train(model, X, Y):
    """STEPS of SGD on mean squared error; the gradients and weights after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        history.append((grads, [p.detach().clone() for p in model.parameters()]))
    return history


def _worker(rank, init_method, out_dir):
    with gloo_group(rank, init_method):
        results = {}
        for backend in BACKENDS:
            with fastlayers.use_backend(backend):
                model, X, Y = _model_and_data()
                ddp = nn.parallel.DistributedDataParallel(model)
                rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
                results[backend] = _train(ddp, X[rows], Y[rows])
        save_rank(results, out_dir, rank)


@pytest.mark.slow
def test_ddp_matches_single_process_training(tmp_path):
    ranks = run_ranks(_worker, tmp_path)
    for backend in BACKENDS:
        with fastlayers.use_backend(backend):
            model, X, Y = _model_and_data()
            assert isinstance(model[0], fastlayers.LinearReLU)
            reference = _train(model, X, Y)
        for step, (ref_grads, ref_weights) in enumerate(reference):
            for rank in range(WORLD):
                grads, weights = ranks[rank][backend][step]
                for i, (g, rg) in enumerate(zip(grads, ref_grads)):
                    # averaged half-batch means vs one full-batch mean: fp32 rounding only
                    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{backend} step {step} rank {rank} "
                                                             f"grad {i}: {m}")
                for i, (w, rw) in enumerate(zip(weights, ref_weights)):
                    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{backend} step {step} rank {rank} "
                                                             f"weight {i}: {m}")
        # the ranks hold bitwise-identical weights (DDP's invariant)
        for w0, w1 in zip(ranks[0][backend][-1][1], ranks[1][backend][-1][1]):
            assert torch.equal(w0, w1)
        # and training moved them: the comparison is not between untouched initial weights
        first, last = reference[0][1][0], reference[-1][1][0]
        assert not torch.equal(first, last)
