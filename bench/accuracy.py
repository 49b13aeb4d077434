"""Accuracy of fastlayers' GEMMs vs torch's, both against a float64 reference on the same
data: ``python -m bench.accuracy``. Prints relative (Frobenius) errors per precision mode;
the fp32 'ieee' (torch 'highest') goal is ours <= 2x torch's own fp32 error."""
import torch

from fastlayers import functional as F
from fastlayers import use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(8192, 4096, 4096), (65536, 256, 256), (2, 64, 8)] if DEVICE == "cuda" else \
    [(256, 512, 128)]


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def main():
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    print(f"{'shape':18s} {'dtype':9s} {'mode':5s} {'ours':>9s} {'torch':>9s} {'ratio':>6s}")
    try:
        for M, K, N in SHAPES:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            x = torch.randn(M, K, device=DEVICE, generator=g)
            w = torch.randn(N, K, device=DEVICE, generator=g) * K ** -0.5
            b = torch.randn(N, device=DEVICE, generator=g)
            ref = torch.relu(x.double() @ w.double().t() + b.double())
            for dtype, modes in ((torch.float32, ("ieee", "tf32")), (torch.bfloat16, ("-",))):
                xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
                for mode in modes:
                    if mode != "-":
                        matmul.fp32_precision = mode
                    with use_backend("triton" if DEVICE == "cuda" else "torch"):
                        ours = F.linear_relu(xs, ws, bs)
                    theirs = torch.relu(torch.nn.functional.linear(xs, ws, bs))
                    eo, et = rel(ours, ref), rel(theirs, ref)
                    name = "x".join(map(str, (M, K, N)))
                    print(f"{name:18s} {str(dtype)[6:]:9s} {mode:5s} {eo:9.2e} {et:9.2e} "
                          f"{eo / et:6.2f}")
    finally:
        matmul.fp32_precision = old


if __name__ == "__main__":
    main()
