"""The launches the sm_90 gate (tests/sm90_compile.py) compiles: each launcher of kernels/
called on never-written CPU tensors at the representative shapes, with every Triton launch
caught and recorded as a compile case (what a GPU launch would compile) instead of run.

``record(kernels, full)`` fills CASES (one per distinct compile) and OPS (per op call: its
Triton launches and the torch kernels it would launch on a GPU).
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SMS = 132  # streaming multiprocessors of an H100 SXM and of an H200
# M, N, K: the benchmark shapes (bench/bench_linear_relu.py: M, K, N = 8192x4096x4096,
# 65536x256x256, 262144x64x64, 2x64x8), odd sizes (unvectorised loads, the most
# registers), a tall-skinny odd one (its weight gradient is split over K) and a tiny odd one.
GEMM_SHAPES = [(8192, 4096, 4096), (65536, 256, 256), (262144, 64, 64), (2, 8, 64),
               (8191, 4095, 4097), (4096, 70, 70), (1_000_003, 20, 20), (3, 5, 7)]
BENCH_GEMM_SHAPES = GEMM_SHAPES[:4]
FULL_ONLY_SHAPES = [(4096, 70, 70)]  # same branch and tile as 8191x4095x4097
PRECISIONS = [("fp32-ieee", torch.float32, "ieee"), ("fp32-tf32", torch.float32, "tf32"),
              ("bf16", torch.bfloat16, "ieee"), ("fp16", torch.float16, "ieee")]  # GEMM inputs


class Case:
    """One distinct compile: a kernel with the signature, constexprs, attributes and
    options of a launch; the label and grid size of the first launch that needed it."""

    def __init__(self, fn, label, signature, constexprs, attrs, options, programs):
        self.fn, self.label, self.uses, self.programs = fn, label, 1, programs
        self.signature, self.constexprs, self.attrs, self.options = \
            signature, constexprs, attrs, options


CASES = {}
SKIPS = []
OPS = {}  # label -> {"triton": n, "torch": n, "kernels": [names]}
LAUNCHES = [0]
_LABEL = [""]

# aten ops that launch no kernel on a GPU (allocation, metadata, views)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "as_strided",
              "t", "transpose", "permute", "expand", "reshape", "alias", "detach", "slice",
              "select", "unsqueeze", "squeeze", "split", "unbind", "lift_fresh", "sym_size",
              "sym_stride", "is_same_size", "_reshape_alias", "view_as", "numpy_T"}


class _TorchKernels(TorchDispatchMode):
    """Counts the aten ops that would launch a GPU kernel inside an op call."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL and _LABEL[0]:
            OPS[_LABEL[0]]["torch"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def case(label):
    """Launches inside are recorded under ``label`` (one op call)."""
    _LABEL[0] = label
    OPS[label] = {"triton": 0, "torch": 0, "kernels": [], "cases": []}
    with _TorchKernels():
        yield
    _LABEL[0] = ""


def intercept(fn, backend, knobs):
    """Replace launches of ``fn`` by recording what a GPU launch would compile."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(fn.signature, fn.params, backend)

    def run(*args, grid, warmup, **kwargs):  # JITFunction.run, up to the compile
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        try:
            g = grid(bound) if callable(grid) else grid
            programs = g[0] * (g[1] if len(g) > 1 else 1) * (g[2] if len(g) > 2 else 1)
        except Exception:  # noqa: BLE001 (a grid we cannot evaluate here: not reported)
            programs = None
        LAUNCHES[0] += 1
        if _LABEL[0]:
            OPS[_LABEL[0]]["triton"] += 1
            OPS[_LABEL[0]]["kernels"].append(fn.__name__)
        key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in CASES:
            CASES[key].uses += 1
        else:
            CASES[key] = Case(fn, _LABEL[0], signature, constexprs, attrs, options, programs)
        if _LABEL[0]:  # the compile of this launch: the label of its first use, its grid
            OPS[_LABEL[0]]["cases"].append((fn.__name__, CASES[key].label, programs))

    fn.run = run


def gemm_launches(kernels, full):
    """linear_relu fwd / bwd_input / bwd_params: fp32 (3xTF32) and bf16 at every shape,
    fp32-tf32 at the headline shape; fixed_hidden fwd / bwd_input at the headline shape in
    fp32 and bf16. ``full``: also fp16, and tf32/fp16 at every shape."""
    lr, fh = kernels.linear_relu, kernels.fixed_hidden
    kernels.gemm.sm_count = lambda *_: SMS  # split-K sized for an H100/H200
    for prec, dtype, mode in PRECISIONS:
        if prec == "fp16" and not full:
            continue
        shapes = GEMM_SHAPES if full else \
            [s for s in GEMM_SHAPES if s not in FULL_ONLY_SHAPES] \
            if prec in ("fp32-ieee", "bf16") else GEMM_SHAPES[:1]
        for M, N, K in shapes:
            x, w, b, y, dy = (torch.empty(s, dtype=dtype) for s in
                              [(M, K), (N, K), (N,), (M, N), (M, N)])
            tag = f"{prec} M={M} N={N} K={K}"
            with case(f"linear_relu_fwd {tag}"):
                lr.linear_relu_fwd(x, w, b, mode)
            with case(f"linear_relu_bwd_input {tag}"):
                lr.linear_relu_bwd_input(dy, y, w, mode)
            with case(f"linear_relu_bwd_params {tag}"):
                lr.linear_relu_bwd_params(dy, y, x, mode)
        if prec not in ("fp32-ieee", "bf16") and not full:
            continue
        M, N, K = GEMM_SHAPES[0]
        x, wf, y, dy = (torch.empty(s, dtype=dtype) for s in [(M, K), (K, N), (M, N), (M, N)])
        tag = f"{prec} M={M} N={N} K={K}"
        with case(f"fixed_hidden_fwd {tag}"):
            fh.fixed_hidden_fwd(x, wf, 1.0, mode)
        with case(f"fixed_hidden_bwd_input {tag}"):
            fh.fixed_hidden_bwd_input(dy, y, wf, mode)


def tma_launches(kernels, full):
    """The opt-in TMA GEMM (FASTLAYERS_TMA=1): each operand layout (K-contiguous or not)
    of the linear_relu GEMMs, fp32 and bf16, plus the memory-bound shape's forward."""
    gemm, gemm_tma = kernels.gemm, kernels.gemm_tma
    if gemm_tma.TensorDescriptor is None:
        SKIPS.append(("_fused_gemm_tma_kernel", "this triton has no host-side TensorDescriptor "
                      "(triton.tools.tensor_descriptor); the TMA kernel is opt-in"))
        return
    launch = gemm_tma.launch

    def on_h100(a, b, gate, bias, c, rs, scalar, flags, cfg, num_programs):
        # fused_gemm passes 4 programs for CPU tensors; a GPU gets per_sm * SM count.
        per_sm = 2 if cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 64 else 1
        launch(a, b, gate, bias, c, rs, scalar, flags, cfg, per_sm * SMS)

    gemm_tma.launch = on_h100
    try:
        for prec, dtype, mode in PRECISIONS[::2]:  # fp32-ieee, bf16
            for M, N, K in (GEMM_SHAPES[0], GEMM_SHAPES[2]):
                x, w, b, y, dy = (torch.empty(s, dtype=dtype) for s in
                                  [(M, K), (N, K), (N,), (M, N), (M, N)])
                tag = f"{prec} M={M} N={N} K={K}"
                with case(f"tma linear_relu_fwd {tag}"):
                    gemm.fused_gemm(x, w.t(), bias=b, relu=True, fp32_mode=mode, path="tma")
                if K == 64:
                    continue
                with case(f"tma linear_relu_bwd_input {tag}"):
                    gemm.fused_gemm(dy, w, gate=y, fp32_mode=mode, path="tma")
                with case(f"tma linear_relu_bwd_params {tag}"):
                    gemm.fused_gemm(dy.t(), x, gate=y.t(), rowsum=True, fp32_mode=mode,
                                    path="tma")
    finally:
        gemm_tma.launch = launch


def _dtypes(full):
    out = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    return out + [("fp16", torch.float16)] if full else out


def centered_launches(kernels, full):
    """Each path of centered(): persistent (one tile per program, several, odd sizes, the
    benchmark's 2^16 and 2^22), split (global and per row), segments (one sweep, two
    sweeps, strided, permuted); the default path (path=None) at the benchmark sizes."""
    c = kernels.centered
    c.sm_count = lambda *_: SMS  # plans sized for an H100/H200
    # _launch_split takes 1 SM for CPU tensors: per_sm * 1 is then a GPU's per_sm * SMS.
    c.GPU_CONFIG["splits_per_sm"] *= SMS
    bar = torch.zeros(2, dtype=torch.int32)
    c._barrier_state = lambda device: bar  # cached per device and stream on a GPU
    for name, dtype in _dtypes(full):
        e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
        segments = full or dtype == torch.float32  # bf16 segments: same code, only --full
        limit = c.GPU_CONFIG["persistent_max_bytes"] // e(0).element_size()
        sizes = (1000, 1 << 16, 1_000_003, 4_194_301, 1 << 22, limit) if full else \
            (1 << 16, 1_000_003, 4_194_301, 1 << 22)  # 4_194_301: odd, 16K-element tiles
        for n in sorted(set(sizes)):
            if n <= limit:
                with case(f"centered {name} numel={n} persistent"):
                    c.centered(e(n), path="persistent")
        for n in (1 << 16, 10_000_019, 1 << 28) if full else (10_000_019, 1 << 28):
            with case(f"centered {name} numel={n} split"):
                c.centered(e(n), path="split")
        with case(f"centered {name} [4, 1<<20] dims=(1,) split"):
            c.centered(e(4, 1 << 20), (1,), path="split")
        if not segments:
            continue
        shapes = (((1000,), ()), ((1024, 64), (1,)), ((64, 8192), (1,)),
                  ((1024, 64), (0,)), ((100, 1000), (1,)), ((8, 512, 33), (1,)),
                  ((32, 3, 224, 224), (0, 2, 3)))
        for shape, dims in shapes if full else [shapes[i] for i in (0, 2, 3, 6)]:
            with case(f"centered {name} {list(shape)} dims={dims} segments"):
                c.centered(e(*shape), dims, path="segments")


def halve_launches(kernels, full):
    """halve_until (one program; partials, count, scale) per dtype, and count_and_sum
    (fp32, bf16)."""
    h = kernels.halve_until
    for name, dtype in _dtypes(full):
        for n in (40, h.ONE_MAX):  # one program (the seed's 2x20; the largest)
            with case(f"halve_until {name} n={n}"):
                h.halve_until(torch.empty(n, dtype=dtype), 1.0, 0)
        for n in (1 << 20, 1_000_003) if full or dtype == torch.float32 else (1_000_003,):
            x = torch.empty(n, dtype=dtype)
            with case(f"halve_until {name} n={n}"):
                h.halve_until(x, 1.0, 0)
            if dtype != torch.float16:
                with case(f"count_and_sum {name} n={n}"):
                    h.count_and_sum(h.halve_partials(x, signed=True), x, 1.0, 0)


def fixed_hidden_mlp_launches(kernels, full):
    """fixed_hidden_mlp_fwd fused (d <= 64: flags per dtype) and composed (d = 70) at the
    benchmark batches (2, 4096, 2^20), and fixed_hidden_mlp_bwd (fused GEMMs) for d = 20 and 70."""
    fm = kernels.fixed_hidden_mlp
    precisions = PRECISIONS if full else PRECISIONS[::2]
    for prec, dtype, mode in precisions:
        e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
        combos = [(4096, 20, False, True), (4096, 64, False, True)]
        if mode == "ieee" and (full or prec == "fp32-ieee"):
            combos += [(4096, 20, True, False), (4096, 20, False, False)]
        if prec == "fp32-ieee":
            combos += [(2, 20, False, False), (1 << 20, 20, False, False),
                       (4096, 20, True, True), (4096, 70, False, True), (4096, 70, True, False)]
        for M, d, reduce_sum, save_h2 in combos:
            with case(f"fixed_hidden_mlp_fwd {prec} M={M} d={d} reduce_sum={reduce_sum} "
                      f"save_h2={save_h2}"):
                fm.fixed_hidden_mlp_fwd(e(M, d), e(d, d), e(d), e(d, d), 1.0, 1.0, 0,
                                        reduce_sum, save_h2, fp32_mode=mode)
        if prec == "fp32-ieee":
            with case(f"fixed_hidden_mlp_fwd {prec} M=4096 d=20 bias=None"):
                fm.fixed_hidden_mlp_fwd(e(4096, 20), e(20, 20), None, e(20, 20), 1.0, 1.0, 0, False,
                                        True)
        if prec in ("fp32-ieee", "bf16"):
            for d in (20, 70):
                with case(f"fixed_hidden_mlp_bwd {prec} M=4096 d={d}"):
                    fm.fixed_hidden_mlp_bwd(e(4096, d), e(4096, d), e(d, d), e(d, d), e(4096, d),
                                            mode)


def record(kernels, full=False):
    """Run every launcher above (kernels: a namespace of the kernels/ modules, every
    @triton.jit ``*_kernel`` in them intercepted)."""
    for launches in (gemm_launches, tma_launches, centered_launches, halve_launches,
                     fixed_hidden_mlp_launches):
        launches(kernels, full)
