"""The parity suite's tools: tensor layouts for every argument, and torch's own float64
composites as the oracle (never fastlayers' other path, never fastlayers.reference)."""
import torch
import torch.nn.functional as torchF

from fastlayers.reference import halve_until_loop

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# contiguous; transposed (column-major); every other element of a wider buffer, at an
# offset; a view at a non-zero storage offset; stride 0 along the first dim (expanded).
LAYOUTS = ("contiguous", "transposed", "step", "offset", "expanded")
# awkward sizes: empty, one, primes, a power of two
SIZES = (0, 1, 2, 3, 5, 7, 13, 16, 31, 37)


def make(shape, dtype=torch.float32, layout="contiguous", device="cpu", scale=1.0):
    """Random normal data (never all zeros) of ``shape`` and ``dtype`` in ``layout``.

    The values depend on the layout (an expanded tensor repeats its first row), so a test
    computes its reference from the tensor it got back."""
    shape = tuple(shape)

    def rnd(s):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    if layout == "contiguous" or len(shape) == 0:
        return rnd(shape)
    if layout == "transposed" and len(shape) >= 2:
        return rnd(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout in ("step", "transposed"):  # (a 1-D "transposed" is a stepped view)
        return rnd(shape[:-1] + (2 * shape[-1] + 1,))[..., 1::2]
    if layout == "offset":
        n = 1
        for s in shape:
            n *= s
        return rnd((n + 3,))[3:].view(shape)
    if layout == "expanded":
        return rnd((1,) + shape[1:]).expand(shape)
    raise ValueError(layout)


def describe(t):
    return f"shape={tuple(t.shape)} stride={t.stride()} offset={t.storage_offset()} {t.dtype}"


# ----------------------------------------------------------------- float64 composites
def d(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def linear_relu64(x, weight, bias=None):
    return torch.relu(torchF.linear(x, weight, bias))


def centered64(x, dim=None):
    if dim is None or (isinstance(dim, tuple) and len(dim) == 0):
        return x - x.mean()
    return x - x.mean(dim, keepdim=True)


def fixed_hidden64(x, weight, c=1.0):
    return torch.relu(x @ weight + c)


def seed_loop_count(y, threshold=1.0):
    """The seed's ``while y.abs().sum() > threshold: y /= 2`` count, run in y's dtype."""
    return halve_until_loop(y.detach(), threshold)[1]


def fixed_hidden_mlp64(x, weight, bias, rand_weight, c=1.0, k=0, reduce=None):
    """The seed's FixedHiddenMLP in float64 with a given halving count k (halving is exact,
    so the loop's result is the body times 2**-k)."""
    y = torchF.linear(torch.relu(torchF.linear(x, weight, bias) @ rand_weight + c), weight, bias)
    y = y * 2.0 ** -k
    return y.sum() if reduce == "sum" else y
