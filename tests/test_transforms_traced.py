"""torch.func transforms that torch.compile traces, and autograd's own batched gradients
(``is_grads_batched``, ``jacobian(vectorize=True)``), through every op on both paths,
against plain-torch float64 composites. Under a traced transform the ops take torch's
ops (Dynamo cannot trace a custom jvp, and the kernels have no batching rule); before,
the custom ops were reached there: zero tangents (wrong, silently) or crashes. A batched
gradient has no memory for a kernel to read."""
import pytest
import torch
from torch.func import grad, jvp

from fastlayers import functional as F
from fastlayers import reference
from fastlayers.ops import halve_until as H

from _util import assert_close_to_ref, randn


def _operands(device):
    return {"w": randn(6, 5, device=device), "b": randn(6, device=device),
            "r": randn(5, 5, device=device), "d": randn(5, 5, device=device, scale=0.5),
            "db": randn(5, device=device, scale=0.5)}


def _mlp_ref(z, o, k):
    """The seed's FixedHiddenMLP body in float64, halved by the op's own count k."""
    w, b = o["d"].double(), o["db"].double()
    h = torch.relu((z @ w.T + b) @ o["r"].double() + 1.0)
    return (h @ w.T + b) * 2.0 ** -k


OPS = {  # name: (fastlayers op of z, float64 plain-torch reference of z64 given k)
    "linear_relu": (lambda z, o: F.linear_relu(z, o["w"], o["b"]),
                    lambda z, o, k: torch.relu(z @ o["w"].double().T + o["b"].double())),
    "centered": (lambda z, o: F.centered(z, -1), lambda z, o, k: z - z.mean(-1, keepdim=True)),
    "fixed_hidden": (lambda z, o: F.fixed_hidden(z, o["r"], 1.0),
                     lambda z, o, k: torch.relu(z @ o["r"].double() + 1.0)),
    "halve_until": (lambda z, o: F.halve_until(z), lambda z, o, k: z * 2.0 ** -k),
    "fixed_hidden_mlp": (lambda z, o: F.fixed_hidden_mlp(z, o["d"], o["db"], o["r"]), _mlp_ref),
}


def _count(name, x, o):
    if name == "halve_until":
        return reference.halve_until_loop(x.cpu(), 1.0)[1]
    if name == "fixed_hidden_mlp":
        return int(F.fixed_hidden_mlp(x, o["d"], o["db"], o["r"], return_count=True)[1])
    return 0


@pytest.mark.parametrize("transform", ["jvp", "grad"])
@pytest.mark.parametrize("name", list(OPS))
def test_compiled_transform_matches_float64(backend, name, transform):
    op, ref = OPS[name]
    o = _operands(backend)
    x, u = randn(4, 5, device=backend, scale=3.0), randn(4, 5, device=backend)
    k = _count(name, x, o)
    torch._dynamo.reset()
    if transform == "jvp":
        got = torch.compile(lambda v, t: jvp(lambda z: op(z, o), (v,), (t,))[1],
                            fullgraph=True, backend="aot_eager")(x, u)
        want = jvp(lambda z: ref(z, o, k), (x.double(),), (u.double(),))[1]
        assert_close_to_ref(got, want, tol=2e-5, what=f"compiled jvp of {name}")
    else:
        v = randn(*op(x, o).shape, device=backend)
        got = torch.compile(grad(lambda z: (op(z, o) * v).sum()), fullgraph=True,
                            backend="aot_eager")(x)
        want = grad(lambda z: (ref(z, o, k) * v.double()).sum())(x.double())
        assert_close_to_ref(got, want, tol=2e-5, what=f"compiled grad of {name}")


def test_compiled_transform_halving_keeps_the_loops_bits(backend):
    """y bit for bit the loop's (negative zeros and subnormal results too); ±inf: the
    loop's limit with a zero tangent, as in eager."""
    x = randn(3, 7, device=backend, scale=5.0)
    x[0, 0], x[0, 1], x[1, 2] = -0.0, -3e-44, 2e-42  # -0.0 stays -0.0; subnormals round
    u = randn(3, 7, device=backend)
    torch._dynamo.reset()
    traced = torch.compile(lambda v, t: jvp(lambda z: H.halve_until(z, 1.0), (v,), (t,)),
                           fullgraph=True, backend="aot_eager")
    (y, k), (tangent, _) = traced(x, u)
    ref, ref_k = reference.halve_until_loop(x.cpu(), 1.0)
    assert int(k) == ref_k and torch.equal(y.cpu().view(torch.int32), ref.view(torch.int32))
    assert torch.equal(tangent.cpu(), u.cpu() * 2.0 ** -ref_k)
    x[2, 3] = float("inf")
    (y, k), (tangent, _) = traced(x, u)
    eager_y, eager_k = H.halve_until(x, 1.0)
    assert int(k) == int(eager_k) == H.K_FOREVER
    assert torch.equal(y.view(torch.int32), eager_y.view(torch.int32))
    assert torch.equal(tangent, torch.zeros_like(tangent))


@pytest.mark.parametrize("name", list(OPS))
def test_vectorized_jacobian_matches_float64(backend, name):
    """torch.autograd.functional.jacobian(vectorize=True): the backward runs once on a
    batch of gradients (autograd's own vmap, is_grads_batched)."""
    op, ref = OPS[name]
    o = _operands(backend)
    x = randn(4, 5, device=backend, scale=3.0)
    k = _count(name, x, o)
    got = torch.autograd.functional.jacobian(lambda z: op(z, o), x, vectorize=True)
    want = torch.autograd.functional.jacobian(lambda z: ref(z, o, k), x.double())
    assert_close_to_ref(got, want, tol=2e-5, what=f"jacobian of {name}")
