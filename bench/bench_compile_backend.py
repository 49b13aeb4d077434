"""One unmodified plain-torch MLP (torchvision.ops.MLP's shape: Linear, ReLU, Dropout(eval)
per hidden layer, then Linear) compiled three ways: ``torch.compile(model,
backend="fastlayers")`` (ours), Inductor's default and Inductor's max-autotune (on CUDA;
its Triton GEMM template is the only Inductor path that fuses the ReLU into the GEMM).

On CUDA: large shapes, bf16 and fp32, forward and forward+backward. On CPU only a small
forward case (ours vs Inductor default): the fused ops then run the torch fallback, so it
shows the backend's overhead, not the kernels' speed.
"""
import pytest
import torch
from torch import nn

from bench.harness import DEVICE, dtype_name

VARIANTS = {"fastlayers": {"backend": "fastlayers"}, "inductor": {},
            "max-autotune": {"mode": "max-autotune"}}
# (batch, width, hidden layers): one wide GEMM chain, one narrow long one.
GPU_SHAPES = [(8192, 4096, 2), (65536, 256, 4)]
GPU_CASES = [(s, d, p, v) for s in GPU_SHAPES for d in (torch.bfloat16, torch.float32)
             for p in ("fwd", "fwd+bwd") for v in VARIANTS
             if not (d == torch.float32 and s != GPU_SHAPES[0])]


def unmodified_mlp(width, hidden_layers, dtype):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout(0.1)]
    layers.append(nn.Linear(width, width))
    return nn.Sequential(*layers).to(DEVICE, dtype).eval()


def _run(record, shape, dtype, pass_, variant):
    torch._dynamo.reset()
    batch, width, depth = shape
    torch.manual_seed(0)
    model = unmodified_mlp(width, depth, dtype)
    compiled = torch.compile(model, **VARIANTS[variant])
    backward = pass_ == "fwd+bwd"

    def make(i):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(batch, width, device=DEVICE, dtype=dtype, generator=g)
        if not backward:
            return lambda: compiled(x)
        x.requires_grad_(True)
        gy = torch.randn(batch, width, device=DEVICE, dtype=dtype, generator=g)
        params = (x, *model.parameters())
        return lambda: torch.autograd.grad(compiled(x), params, gy)

    gemms = depth + 1
    flops = 2 * batch * width * width * gemms * (3 if backward else 1)
    elsize = torch.empty((), dtype=dtype).element_size()
    act = batch * width * (gemms + 1) * (3 if backward else 1)
    nbytes = (act + gemms * (width * width + width) * (2 if backward else 1)) * elsize
    with torch.no_grad() if not backward else torch.enable_grad():
        record(make, op="mlp_compiled", variant=variant, pass_=pass_, dtype=dtype,
               shape=(batch, width, depth), flops=flops, nbytes=nbytes)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="GPU comparison: needs CUDA")
@pytest.mark.parametrize("shape, dtype, pass_, variant", GPU_CASES,
                         ids=["-".join([("x".join(map(str, s))), dtype_name(d), p, v])
                              for s, d, p, v in GPU_CASES])
def test_compiled_mlp_gpu(record, shape, dtype, pass_, variant):
    _run(record, shape, dtype, pass_, variant)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU case; CUDA runs test_compiled_mlp_gpu")
@pytest.mark.parametrize("variant", ["fastlayers", "inductor"])
def test_compiled_mlp_cpu(record, variant):
    _run(record, (256, 64, 2), torch.float32, "fwd", variant)
