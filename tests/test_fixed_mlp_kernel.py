"""fixed_hidden_mlp with a bias of any layout (issue 9 item 1): a stride-0 expanded bias,
a ``[1::2]`` view, a column of a matrix, on both paths (the fused kernel for d <= 64, the
composed GEMMs above), against the float64 torch composite and the loop's count."""
import pytest
import torch
import torch.nn.functional as TF

from fastlayers import functional as F
from fastlayers.reference import halve_until_loop

from _util import assert_close_to_ref, randn


def bias_of_layout(d, layout, gen):
    if layout == "expanded":  # stride 0
        return torch.rand(1, generator=gen, dtype=torch.float64).expand(d) * 2 - 1
    if layout == "step2":  # stride 2, storage offset 1
        return (torch.rand(2 * d, generator=gen, dtype=torch.float64) * 2 - 1)[1::2]
    return (torch.rand(d, 3, generator=gen, dtype=torch.float64) * 2 - 1)[:, 1]  # stride 3


@pytest.mark.parametrize("d", [20, 70])
@pytest.mark.parametrize("layout", ["expanded", "step2", "column"])
@pytest.mark.parametrize("reduce", [None, "sum"])
def test_bias_of_any_layout(backend, d, layout, reduce):
    gen = torch.Generator().manual_seed(d)
    w = (torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1) * d ** -0.5
    r = torch.rand(d, d, generator=gen, dtype=torch.float64)
    b = bias_of_layout(d, layout, gen)
    x = randn(7, d, dtype=torch.float64)
    y64 = TF.linear(torch.relu(TF.linear(x, w, b) @ r + 1.0), w, b)
    ref, k64 = halve_until_loop(y64)
    f32 = [t.to(device=backend, dtype=torch.float32) for t in (x, w, r)]
    b32 = b.to(dtype=torch.float32)
    b32 = {"expanded": b32[:1].clone().expand(d),  # a storage of one element
           "step2": b32.repeat_interleave(2)[1::2],
           "column": b32[:, None].repeat(1, 3)[:, 1]}[layout].to(backend)
    assert b32.stride(0) == {"expanded": 0, "step2": 2, "column": 3}[layout]
    out, k = F.fixed_hidden_mlp(f32[0], f32[1], b32, f32[2], reduce=reduce, return_count=True)
    assert int(k) == k64
    assert_close_to_ref(out, ref.sum() if reduce == "sum" else ref, torch.float32,
                        tol=None if reduce is None else 1e-4, what=f"{layout} d={d}")
