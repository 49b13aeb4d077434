"""The sm_90 gate: compile every default-path Triton kernel of kernels/ for an H100/H200,
on a CPU, and fail on what would cost speed there.

    python tests/sm90_compile.py [--full] [-j JOBS] [-k SUBSTRING] [--json PATH]

The real launchers run on (never written) CPU tensors with each kernel's launch caught:
its arguments go through Triton's own binder, so the compile gets what a GPU launch would
(dtypes, 16-byte alignment, ints equal to 1 or divisible by 16, constexprs, num_warps,
num_stages), from the launchers' own configs (``gemm.heuristic_config``, centered's plans,
...) with an H100/H200's SM count. Each distinct one is compiled once by ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` through ptxas, in a fresh cache.

FAIL (exit 1) when a compile errors, when ptxas warns C7515 (wgmma serialised), when
spill stores + loads pass ``--spill-budget`` bytes, or when a ``tl.dot`` whose tile allows
wgmma (BLOCK_M >= 64, warps a multiple of 4, 16-bit or tf32 operands) lowers to something
else. One row per compile: kernel, the config, registers, spills, shared memory, blocks per
SM (and the limit: regs/smem/warps) and waves on 132 SMs for the first launch that needed
it, the MMA instruction (PTX; SASS HGMMA count when a disassembler is there), and the
launches (Triton kernels + torch kernels) of that op call. Exit 77 (nothing compiled)
without triton, its NVIDIA backend or ptxas.

The default case list is the CI gate: every GEMM config the heuristics pick at the
benchmark shapes, odd, tall-skinny and tiny shapes in fp32 (3xTF32) and bf16, the tf32
configs at the headline shape, the TMA kernel, centered, halve and fixed_hidden_mlp in fp32
and bf16 (fewer centered shapes, halve sizes and fixed_hidden_mlp flags in bf16). ``--full``
adds fp16 everywhere, tf32/fp16 at every GEMM shape, and the rest of those cases.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sm90_facts as facts  # noqa: E402
import sm90_launches as launches  # noqa: E402

ARCH = 90
SKIP_RC = 77
SPILL_BUDGET_BYTES = 256  # spill stores + loads of one compile (ptxas -v)


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


# ----------------------------------------------------------------------------- compiling
_LIST = []
_TARGET = []


def compile_case(i):
    """(ok, facts dict or error text, seconds) for _LIST[i]."""
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
    out = facts.ptxas_facts(log.getvalue())
    out["smem"] = int(getattr(k.metadata, "shared", 0) or 0)
    out["mma"] = facts.mma_kind(k.asm.get("ptx", ""))
    out["sass"] = facts.sass_counts(k.asm.get("cubin", b""))
    return True, out, time.perf_counter() - t0


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


# ----------------------------------------------------------------------------- the verdict
_SOURCES = {}


def config_of(c) -> str:
    """The launch config of a case: its block constexprs, warps and stages."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK", "BLOCK_A", "BLOCK_C", "BLOCK_I", "DP")
    named = getattr(c, "named", {})
    vals = [str(named[k]) for k in keys if isinstance(named.get(k), int)
            and not isinstance(named.get(k), bool)]
    cfg = "x".join(vals) or "-"
    return f"{cfg}/w{c.options.num_warps}/s{c.options.num_stages}"


def _constexprs_by_name(c):
    """{name: value} of a case's constexprs (the compile keys them by argument index)."""
    out = {}
    for key, val in c.constexprs.items():
        idx = key[0] if isinstance(key, tuple) else key
        if isinstance(idx, int) and idx < len(c.fn.arg_names):
            out[c.fn.arg_names[idx]] = val
        elif isinstance(idx, str):
            out[idx] = val
    return out


def judge(c, info, budget):
    """The row of a compiled case and its problems (empty: it passes)."""
    import inspect
    src = _SOURCES.setdefault(c.fn.__name__, inspect.getsource(c.fn.fn))
    warps = c.options.num_warps
    occ = facts.ctas_per_sm(info["regs"] or 255, info["smem"], warps)
    op = launches.OPS.get(c.label, {"triton": 0, "torch": 0})
    row = dict(kernel=c.fn.__name__, case=c.label, uses=c.uses, config=config_of(c),
               regs=info["regs"], spill=info["spill_stores"] + info["spill_loads"],
               smem=info["smem"], ctas=occ["ctas"], limit=occ["limit"], programs=c.programs,
               waves=facts.waves(c.programs, occ["ctas"]) if c.programs else None,
               mma=info["mma"], sass=info["sass"], warnings=info["warnings"],
               launches=f"{op['triton']}+{op['torch']}")
    problems, known = [], []
    if info["serialized"]:
        why = f"C7515: wgmma serialized {info.get('serialized_why', '')}".strip()
        if c.named.get("PRECISION") == "tf32" and c.signature.get("a_ptr") == "*fp32":
            known.append(why + " [KNOWN: plain tf32, see gemm.heuristic_config]")
        else:
            problems.append(why)
    if row["spill"] > budget:
        problems.append(f"spills {row['spill']} B > {budget} B")
    if facts.wgmma_expected(src, c.named, warps) and info["mma"] != "wgmma":
        problems.append(f"tl.dot lowered to {info['mma']}, not wgmma")
    if occ["ctas"] == 0:
        problems.append("does not fit on an SM")
    row["known"] = known
    return row, problems


HEADER = (f"{'':4} {'kernel':<26} {'config':<22} {'regs':>4} {'spill':>5} {'smem':>7} "
          f"{'CTA/SM':>9} {'waves':>7} {'mma':>5} {'HGMMA':>5} {'launch':>6}  case")


def format_row(row, ok):
    w = row["waves"]
    waves = "?" if w is None else f"{w:.2f}" if w >= 0.1 else f"{w:.4f}"
    sass = row["sass"]["HGMMA"] if row["sass"] else "?"
    uses = f" (+{row['uses'] - 1} same)" if row["uses"] > 1 else ""
    verdict = "FAIL" if not ok else "KNWN" if row.get("known") else "OK"
    return (f"{verdict:<4} {row['kernel']:<26} {row['config']:<22} "
            f"{row['regs'] or '?':>4} {row['spill']:>5} {row['smem']:>7} "
            f"{row['ctas']:>3} {row['limit']:<5} {waves:>7} {row['mma']:>5} {sass:>5} "
            f"{row['launches']:>6}  {row['case']}{uses}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=max(1, len(os.sched_getaffinity(0))),
                    help="parallel compiles (default: the usable CPUs)")
    ap.add_argument("-k", default="", help="only cases whose label matches this regex")
    ap.add_argument("--full", action="store_true", help="every dtype at every shape")
    ap.add_argument("--spill-budget", type=int, default=SPILL_BUDGET_BYTES)
    ap.add_argument("--json", help="also write the rows (and launches per op) here")
    args = ap.parse_args(argv)
    reason = cannot_compile()
    if reason:
        print(f"SKIP all: {reason}")
        return SKIP_RC
    t_start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="sm90-compile-")
    os.environ["TRITON_CACHE_DIR"] = cache  # compile everything (and get ptxas logs)
    try:
        return run(args, t_start)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def setup(full=False):
    """Intercept every kernel of kernels/ and record the launches; returns the cases."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    names = ("centered", "fixed_hidden", "fixed_hidden_mlp", "gemm", "gemm_tma", "halve_until",
             "linear_relu")
    kernels = types.SimpleNamespace(
        **{m: importlib.import_module(f"fastlayers.kernels.{m}") for m in names})
    torch.set_num_threads(1)
    _TARGET.append(GPUTarget("cuda", ARCH, 32))
    backend = make_backend(_TARGET[0])
    for module in vars(kernels).values():  # every kernel: none may launch for real here
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                launches.intercept(fn, backend, knobs)
    launches.record(kernels, full)
    for c in launches.CASES.values():
        c.named = _constexprs_by_name(c)
    return list(launches.CASES.values())


def run(args, t_start):
    import triton
    cases = setup(args.full)
    _LIST.extend(c for c in cases if re.search(args.k, c.label))
    print(f"triton {triton.__version__}, target sm_{ARCH} ({facts.SMS} SMs): {len(_LIST)} "
          f"distinct compiles from {launches.LAUNCHES[0]} launches, {args.jobs} jobs; "
          f"spill budget {args.spill_budget} B", flush=True)
    for name, why in launches.SKIPS:
        print(f"SKIP {name}: {why}", flush=True)
    print("launch: Triton kernels + torch kernels of the op call; CTA/SM: resident blocks "
          "per SM (limit); waves: programs / (CTA/SM x 132)", flush=True)
    print(HEADER, flush=True)
    n_fail, t_compile, rows = 0, 0.0, []
    for c, (ok, info, secs) in zip(_LIST, compile_all(args.jobs)):
        t_compile += secs
        if not ok:
            n_fail += 1
            print(f"FAIL {c.fn.__name__:<26} {config_of(c):<22} {c.label} ({secs:.1f}s)\n    "
                  + "\n    ".join(info.splitlines()[:60]), flush=True)
            continue
        row, problems = judge(c, info, args.spill_budget)
        row["seconds"] = round(secs, 1)
        row["verdict"] = "FAIL" if problems else "KNOWN" if row["known"] else "OK"
        rows.append(row)
        n_fail += bool(problems)
        print(format_row(row, not problems), flush=True)
        for p in problems + row["known"]:
            print(f"     ^ {p}", flush=True)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows, ops=launches.OPS), f, indent=1)
    n_known = sum(bool(r["known"]) for r in rows)
    print(f"{len(_LIST) - n_fail} OK ({n_known} of them KNOWN), {n_fail} FAIL; "
          f"{t_compile:.1f}s of compiles, "
          f"{time.perf_counter() - t_start:.1f}s wall", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
