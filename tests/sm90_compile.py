"""Compile every default-path Triton kernel of kernels/ for an H100/H200 (sm_90), on a CPU.

    python tests/sm90_compile.py [-j JOBS] [-k SUBSTRING]

The real launchers run on (never written) CPU tensors with each kernel's launch caught:
its arguments go through Triton's own binder, so the compile gets what a GPU launch would
(dtypes, 16-byte alignment, ints equal to 1 or divisible by 16, constexprs, num_warps,
num_stages), from the launchers' own configs (``gemm.heuristic_config``, centered's plans,
...) with an H100/H200's SM count. Each distinct one is compiled by ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` through ptxas, in a fresh cache. One line per compile: OK or
FAIL, kernel, case (of the first launch needing it; "+N same": further ones), registers
and spill stores/loads (ptxas -v) and shared memory bytes. Exit status 1 if any
compile failed; 77 (nothing compiled) without triton, its NVIDIA backend or ptxas.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
for _var in ("FASTLAYERS_TMA", "FASTLAYERS_AUTOTUNE"):  # the default launch path
    os.environ.pop(_var, None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, unwarned
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import multiprocessing.connection  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

ARCH = 90
SMS = 132  # streaming multiprocessors of an H100 SXM and of an H200
# M, N, K: the benchmark shapes, then odd sizes (unvectorised loads, the most registers)
GEMM_SHAPES = [(8192, 4096, 4096), (65536, 256, 256), (262144, 64, 64), (2, 8, 64),
               (8191, 4095, 4097)]
SKIP_RC = 77
PRECISIONS = [("fp32-ieee", torch.float32, "ieee"), ("fp32-tf32", torch.float32, "tf32"),
              ("bf16", torch.bfloat16, "ieee"), ("fp16", torch.float16, "ieee")]  # GEMM inputs


def cannot_compile():
    """None, or why this Python cannot compile for sm_90 (no triton, backend or ptxas)."""
    try:
        import triton
    except ImportError as e:
        return f"triton is not installed ({e})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton {triton.__version__} has no NVIDIA backend ({e})"
    try:
        path = get_ptxas(ARCH).path
    except Exception as e:  # noqa: BLE001 (any failure to locate it)
        return f"triton {triton.__version__}'s NVIDIA backend has no ptxas ({e})"
    if not path or not os.path.isfile(path):
        return f"triton {triton.__version__}'s NVIDIA backend has no ptxas (looked for {path})"
    return None


class Case:
    """One distinct compile: a kernel with the signature, constexprs, attributes and
    options of a launch, the label of the first launch that needed it."""

    def __init__(self, fn, label, signature, constexprs, attrs, options):
        self.fn, self.label, self.uses = fn, label, 1
        self.signature, self.constexprs, self.attrs, self.options = \
            signature, constexprs, attrs, options


CASES = {}
SKIPS = []
LAUNCHES = [0]
_LABEL = [""]


@contextlib.contextmanager
def case(label):
    """Launches inside are recorded under ``label``."""
    _LABEL[0] = label
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
        LAUNCHES[0] += 1
        key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in CASES:
            CASES[key].uses += 1
        else:
            CASES[key] = Case(fn, _LABEL[0], signature, constexprs, attrs, options)

    fn.run = run


# ----------------------------------------------------------------------------- the launches
def gemm_launches(kernels):
    """linear_relu fwd / bwd_input / bwd_params at every shape (fp32 and bf16) and once
    in fp32-tf32 and fp16; fixed_hidden fwd / bwd_input in each precision."""
    lr, fh = kernels.linear_relu, kernels.fixed_hidden
    for prec, dtype, mode in PRECISIONS:
        shapes = GEMM_SHAPES if prec in ("fp32-ieee", "bf16") else GEMM_SHAPES[:1]
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
        M, N, K = GEMM_SHAPES[0]
        x, wf, y, dy = (torch.empty(s, dtype=dtype) for s in [(M, K), (K, N), (M, N), (M, N)])
        tag = f"{prec} M={M} N={N} K={K}"
        with case(f"fixed_hidden_fwd {tag}"):
            fh.fixed_hidden_fwd(x, wf, 1.0, mode)
        with case(f"fixed_hidden_bwd_input {tag}"):
            fh.fixed_hidden_bwd_input(dy, y, wf, mode)


def tma_launches(kernels):
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


def centered_launches(kernels):
    """Each path of centered(): persistent (one tile per program, several, odd sizes),
    split (global and per row), segments (one sweep, two sweeps, strided, permuted)."""
    c = kernels.centered
    c.sm_count = lambda *_: SMS  # plans sized for an H100/H200
    # _launch_split takes 1 SM for CPU tensors: per_sm * 1 is then a GPU's per_sm * SMS.
    c.GPU_CONFIG["splits_per_sm"] *= SMS
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
        limit = c.GPU_CONFIG["persistent_max_bytes"] // e(0).element_size()
        for n in (1000, 1_000_003, limit):
            with case(f"centered {name} numel={n} persistent"):
                c.centered(e(n), path="persistent")
        for n in (1 << 16, 10_000_019):
            with case(f"centered {name} numel={n} split"):
                c.centered(e(n), path="split")
        with case(f"centered {name} [4, 1<<20] dims=(1,) split"):
            c.centered(e(4, 1 << 20), (1,), path="split")
        for shape, dims in (((1000,), ()), ((1024, 64), (1,)), ((64, 8192), (1,)),
                            ((1024, 64), (0,)), ((100, 1000), (1,)), ((8, 512, 33), (1,)),
                            ((32, 3, 224, 224), (0, 2, 3))):
            with case(f"centered {name} {list(shape)} dims={dims} segments"):
                c.centered(e(*shape), dims, path="segments")


def halve_launches(kernels):
    """halve_until (partials, count, scale) per dtype, and count_and_sum (fp32, bf16)."""
    h = kernels.halve
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for n in (1 << 20, 1_000_003):
            x = torch.empty(n, dtype=dtype)
            with case(f"halve_until {name} n={n}"):
                h.halve_until(x, 1.0)
            if dtype != torch.float16:
                with case(f"count_and_sum {name} n={n}"):
                    h.count_and_sum(h.halve_partials(x, signed=True), 1.0, dtype)


def fixed_mlp_launches(kernels):
    """fixed_mlp_fwd fused (d <= 64: flags per dtype) and composed (d = 70), and
    fixed_mlp_bwd (fused GEMMs) for d = 20 and 70."""
    fm = kernels.fixed_mlp
    M = 4096
    for prec, dtype, mode in PRECISIONS:
        e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
        combos = [(20, False, True), (64, False, True)]
        if mode == "ieee":
            combos += [(20, True, False), (20, False, False)]
        if prec == "fp32-ieee":
            combos += [(20, True, True), (70, False, True), (70, True, False)]
        for d, reduce_sum, save_h2 in combos:
            with case(f"fixed_mlp_fwd {prec} M={M} d={d} reduce_sum={reduce_sum} "
                      f"save_h2={save_h2}"):
                fm.fixed_mlp_fwd(e(M, d), e(d, d), e(d), e(d, d), 1.0, 1.0, reduce_sum,
                                 save_h2, fp32_mode=mode)
        if prec == "fp32-ieee":
            with case(f"fixed_mlp_fwd {prec} M={M} d=20 bias=None"):
                fm.fixed_mlp_fwd(e(M, 20), e(20, 20), None, e(20, 20), 1.0, 1.0, False, True)
        if prec in ("fp32-ieee", "bf16"):
            for d in (20, 70):
                with case(f"fixed_mlp_bwd {prec} M={M} d={d}"):
                    fm.fixed_mlp_bwd(e(M, d), e(M, d), e(d, d), e(d, d), e(M, d), mode)


# ----------------------------------------------------------------------------- compiling
_LIST = []
_TARGET = []


def compile_case(i):
    """(ok, info, seconds) for _LIST[i]: info is the ptxas/metadata summary or the error."""
    import triton
    from triton.compiler import ASTSource
    c = _LIST[i]
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # the ptxas log is print()ed
            k = triton.compile(ASTSource(c.fn, c.signature, c.constexprs, c.attrs),
                               target=_TARGET[0], options=c.options.__dict__)
    except Exception as e:  # noqa: BLE001 (a failed compile is the report)
        return False, f"{type(e).__name__}: {e}", time.perf_counter() - t0
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    info = [f"regs={regs.group(1) if regs else '?'}"]
    if spill:
        st, ld = int(spill.group(1)), int(spill.group(2))
        info.append(f"spill={st}/{ld}B" + (" SPILLS" if st or ld else ""))
    info.append(f"smem={getattr(k.metadata, 'shared', '?')}")
    o = c.options
    info.append(f"warps={o.num_warps} stages={o.num_stages}")
    return True, " ".join(info), time.perf_counter() - t0


def _worker(conn):  # in a forked process: compile the cases the parent sends
    for i in iter(conn.recv, None):
        conn.send(compile_case(i))


def _start_worker(ctx):
    conn, child_end = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child_end,), daemon=True)
    proc.start()
    child_end.close()  # the worker's death then reads as EOF here
    return conn, proc


def compile_all(jobs):
    """compile_case(i) for every case, in order, on ``jobs`` forked workers; a compiler
    crash (an abort in an MLIR pass) fails that case alone and the worker is replaced."""
    ctx = multiprocessing.get_context("fork")
    todo, busy, done, nxt = list(range(len(_LIST))), {}, {}, 0

    def give(conn, proc):
        if todo:
            i = todo.pop(0)
            conn.send(i)
            busy[conn] = (i, proc)
        else:
            conn.send(None)
            proc.join()
            conn.close()

    for _ in range(min(jobs, len(todo))):
        give(*_start_worker(ctx))
    while busy:
        for conn in multiprocessing.connection.wait(list(busy)):
            i, proc = busy.pop(conn)
            try:
                done[i] = conn.recv()
            except EOFError:
                proc.join()
                conn.close()
                done[i] = (False, f"the compiling process died (exit code {proc.exitcode})", 0.0)
                conn, proc = _start_worker(ctx)
            give(conn, proc)
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=max(1, len(os.sched_getaffinity(0))),
                    help="parallel compiles (default: the usable CPUs)")
    ap.add_argument("-k", default="", help="only cases whose label contains this")
    args = ap.parse_args(argv)
    reason = cannot_compile()
    if reason:
        print(f"SKIP all: {reason}")
        return SKIP_RC
    t_start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="sm90-compile-")
    os.environ["TRITON_CACHE_DIR"] = cache  # compile everything (and get ptxas logs)
    try:
        return _run(args, t_start)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run(args, t_start):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from triton.runtime.jit import JITFunction

    names = ("centered", "fixed_hidden", "fixed_mlp", "gemm", "gemm_tma", "halve", "linear_relu")
    kernels = types.SimpleNamespace(
        **{m: importlib.import_module(f"fastlayers.kernels.{m}") for m in names})
    torch.set_num_threads(1)
    _TARGET.append(GPUTarget("cuda", ARCH, 32))
    backend = make_backend(_TARGET[0])
    for module in vars(kernels).values():  # every kernel: none may launch for real here
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                intercept(fn, backend, knobs)
    for launches in (gemm_launches, tma_launches, centered_launches, halve_launches,
                     fixed_mlp_launches):
        launches(kernels)
    _LIST.extend(c for c in CASES.values() if args.k in c.label)
    print(f"triton {triton.__version__}, target sm_{ARCH} ({SMS} SMs): {len(_LIST)} distinct "
          f"compiles from {LAUNCHES[0]} launches, {args.jobs} jobs", flush=True)
    for name, why in SKIPS:
        print(f"SKIP {name}: {why}", flush=True)
    n_fail, t_compile = 0, 0.0
    for c, (ok, info, secs) in zip(_LIST, compile_all(args.jobs)):
        t_compile += secs
        uses = f" (+{c.uses - 1} same)" if c.uses > 1 else ""
        if ok:
            print(f"OK   {c.fn.__name__:<26} {c.label}{uses}: {info} ({secs:.1f}s)", flush=True)
        else:
            n_fail += 1
            print(f"FAIL {c.fn.__name__:<26} {c.label}{uses} ({secs:.1f}s)\n    "
                  + "\n    ".join(info.splitlines()[:60]), flush=True)
    print(f"{len(_LIST) - n_fail} OK, {n_fail} FAIL; {t_compile:.1f}s of compiles, "
          f"{time.perf_counter() - t_start:.1f}s wall", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
