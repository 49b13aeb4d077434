"""DTensor inputs (torch.distributed.tensor) through the fastlayers layers, 2 CPU processes
(gloo): values and gradients equal plain torch's float64 on the whole tensor, on the torch
path and under the kernel path's backend (subclass tensors take torch's ops there); a
global mean covers every shard and a partial sum is not changed in place. The halving ops
refuse a DTensor clearly (before: each rank halved by its own shard's count)."""
import pytest
import torch
from torch.nn import functional as TF

import fastlayers
from fastlayers import _backend
from fastlayers import functional as F

from _distributed import WORLD, gloo_group, run_ranks, save_rank

BACKENDS = ["torch"] + (["triton"] if _backend.interpreting() else [])


def _data():
    g = torch.Generator().manual_seed(7)
    return {"x": torch.randn(8, 6, generator=g), "g": torch.randn(8, 5, generator=g),
            "w": torch.randn(5, 6, generator=g), "b": torch.randn(5, generator=g),
            "mlp_x": torch.rand(6, 8, generator=g) * 3}


def _layers():
    torch.manual_seed(3)
    return {"LinearReLU": fastlayers.LinearReLU(6, 5), "MyLinear": fastlayers.MyLinear(6, 5),
            "FixedHiddenMatmul": fastlayers.FixedHiddenMatmul(6, 5)}


def _grads(module):
    return [p.grad.full_tensor() for p in module.parameters()]


def _worker(rank, init_method, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    def shard(t, dim=0, grad=False):
        return distribute_tensor(t.clone(), mesh, [Shard(dim)]).requires_grad_(grad)

    with gloo_group(rank, init_method):
        mesh = init_device_mesh("cpu", (WORLD,))
        d, results = _data(), {}
        for backend in BACKENDS:
            out = results[backend] = {}
            with fastlayers.use_backend(backend):
                for name, layer in _layers().items():
                    module = distribute_module(layer, mesh)  # parameters Replicate
                    x = shard(d["x"], grad=True)
                    y = module(x)
                    (y * shard(d["g"])).sum().backward()
                    out[name] = (y.full_tensor(), x.grad.full_tensor(), _grads(module))
                for dim in (None, -1):
                    x = shard(d["x"], dim=1, grad=True)
                    y = fastlayers.CenteredLayer(dim)(x)
                    (y * shard(d["x"].flip(0), dim=1)).sum().backward()
                    out[f"centered {dim}"] = (y.full_tensor(), x.grad.full_tensor())
                refusals = []
                for call in (lambda: F.halve_until(shard(d["x"])),
                             lambda: distribute_module(fastlayers.FixedHiddenMLP(8), mesh)(
                                 shard(d["mlp_x"]))):
                    try:
                        call()
                    except NotImplementedError as exc:
                        refusals.append(str(exc))
                out["refusals"] = refusals
                w = distribute_tensor(d["w"].clone(), mesh, [Shard(1)])  # x @ w.T: Partial
                b = distribute_tensor(d["b"].clone(), mesh, [Replicate()])
                with torch.no_grad():
                    out["partial"] = F.linear_relu(shard(d["x"], dim=1), w, b).full_tensor()
        save_rank(results, out_dir, rank)


@pytest.mark.slow
def test_dtensor_inputs_match_float64_on_the_whole_tensor(tmp_path):
    ranks = run_ranks(_worker, tmp_path)
    d = {k: v.double() for k, v in _data().items()}
    close = dict(rtol=1e-5, atol=1e-5)
    for backend in BACKENDS:
        for name, layer in _layers().items():
            layer = layer.double()
            x = d["x"].clone().requires_grad_()
            y = layer(x)
            (y * d["g"]).sum().backward()
            for rank in range(WORLD):
                got_y, got_dx, got_grads = ranks[rank][backend][name]
                msg = f"{backend} {name} rank {rank}"
                torch.testing.assert_close(got_y.double(), y.detach(), **close, msg=msg)
                torch.testing.assert_close(got_dx.double(), x.grad, **close, msg=msg)
                for g, p in zip(got_grads, layer.parameters()):
                    torch.testing.assert_close(g.double(), p.grad, **close, msg=msg)
        for dim in (None, -1):
            x = d["x"].clone().requires_grad_()
            y = x - (x.mean() if dim is None else x.mean(dim, keepdim=True))
            (y * d["x"].flip(0)).sum().backward()
            for rank in range(WORLD):
                got_y, got_dx = ranks[rank][backend][f"centered {dim}"]
                torch.testing.assert_close(got_y.double(), y.detach(), **close)
                torch.testing.assert_close(got_dx.double(), x.grad, **close)
        partial = torch.relu(TF.linear(d["x"], d["w"], d["b"]))
        for rank in range(WORLD):
            refusals = ranks[rank][backend]["refusals"]
            assert len(refusals) == 2 and all("DTensor" in r and "full_tensor()" in r
                                              for r in refusals), refusals
            torch.testing.assert_close(ranks[rank][backend]["partial"].double(), partial, **close)
