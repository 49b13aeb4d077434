"""A static report of the GPU benchmark cases: compile facts from the sm_90 gate and a
roofline estimate per case (MODEL, NOT MEASURED) next to the goal of issues 2-4, so a
reader sees which goals are at risk before a GPU run. Measured numbers replace it.

    python -m bench.static_report [--gate-json PATH] [--out bench/results/static-report.md]

Without --gate-json it runs the gate (tests/sm90_compile.py, minutes; the GPU machine's
triton when FASTLAYERS_SM90_TRITON_PATH names a folder holding it) and reads its JSON.

The model, per case: device time = max(FLOPs / matrix rate, minimal bytes / copy
bandwidth), the compute term stretched by wave quantisation (ceil(waves) / waves of the
main GEMM); for the persistent centering kernel the bandwidth is capped by bytes in flight
(Little's law: 132 SMs x tile bytes / 1 us of memory latency, an assumption); host floor =
launches x 4.4 us (one tiny Triton launch, measured on the H200: shared/gpu-anchors.json);
estimate = max(device, host floor) + (launches - 1) x 2 us of gaps (an assumption). Rates
are the H200 anchors: copy 4221 GB/s, bf16 GEMM 686 TFLOP/s, tf32 356 (3xTF32: a third).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = [ROOT / "shared" / "gpu-anchors.json", ROOT.parent / "shared" / "gpu-anchors.json",
           Path("/work/shared/gpu-anchors.json")]
LAUNCH_US = 4.4   # anchors: "one tiny triton kernel (python launch)" 0.004416 ms
GAP_US = 2.0      # assumed gap between back-to-back launches of one op call
LATENCY_US = 1.0  # assumed DRAM latency for the bytes-in-flight cap
SMS = 132


def anchors():
    for p in ANCHORS:
        if p.is_file():
            rows = json.loads(p.read_text())["rows"]
            return {r["name"]: r for r in rows}, str(p.relative_to(p.parents[1]))
    raise SystemExit("static_report: shared/gpu-anchors.json not found")


def cases(a):
    """(name, gate labels of the op call(s), flops, bytes, elsize, goal_us, goal_text)."""
    ms = lambda name: a[name]["ms"] * 1e3  # noqa: E731  (anchor time in us)
    out = []
    for (M, K, N) in [(8192, 4096, 4096), (65536, 256, 256), (262144, 64, 64), (2, 64, 8)]:
        for dt, prec, esz in (("bf16", "bf16", 2), ("fp32", "fp32-ieee", 4)):
            tag = f"{prec} M={M} N={N} K={K}"
            dtype = "bfloat16" if dt == "bf16" else "float32"
            lt = ms(f"cublasLt _addmm_activation {dtype} M{M} K{K} N{N}")
            eager = ms(f"eager F.relu(F.linear) {dtype} M{M} K{K} N{N}")
            goal, text = None, "-"
            if dt == "bf16" and M == 8192:
                goal, text = lt, "<= 1.00x cuBLASLt (issue 2)"
            elif dt == "bf16" and M == 65536:
                goal, text = 0.9 * lt, "<= 0.9x cuBLASLt (issue 2)"
            elif dt == "bf16" and M == 262144:
                nbytes = (M * K + N * K + N + M * N) * esz
                goal = nbytes / (0.85 * a["d2d copy 1GiB fp32 (read+write)"]["gbps"]) / 1e3
                text = ">= 85% copy bandwidth (issue 2)"
            elif dt == "fp32" and M == 8192:
                goal, text = 0.67 * eager, "<= 0.67x eager fp32 (issue 2)"
            elif M == 2:
                goal, text = eager, "<= eager per call (issue 2)"
            fwd = (M * K + N * K + N + M * N) * esz
            out.append((f"LinearReLU fwd {dt} {M}x{K}x{N}", [f"linear_relu_fwd {tag}"],
                        2 * M * N * K, fwd, prec, goal, text))
            if M in (8192, 65536) and dt == "bf16":
                bwd = (M * N * 2 + M * K + N * K) + (M * K + N * K + N)
                g = 0.9 * ms(f"eager fwd+bwd bf16 M{M} K{K} N{N}") if M == 8192 else None
                out.append((f"LinearReLU fwd+bwd {dt} {M}x{K}x{N}",
                            [f"linear_relu_{p} {tag}" for p in ("fwd", "bwd_input", "bwd_params")],
                            6 * M * N * K, fwd + bwd * esz, prec, g,
                            "<= 0.9x eager (issue 2)" if g else "-"))
    for dt, esz in (("fp32", 4), ("bf16", 2)):
        for n in (1 << 16, 1 << 22, 1 << 28):
            path = "split" if n == 1 << 28 else "persistent"
            eager = ms(f"eager x - x.mean() {'float32' if dt == 'fp32' else 'bfloat16'} "
                       f"n=2^{n.bit_length() - 1}")
            goal, text = None, "-"
            if n == 1 << 16:
                goal, text = 8.0, "<= 8 us (issue 3)"
            elif n == 1 << 22 and dt == "fp32":
                goal, text = 10.0, "<= 10 us (issue 3)"
            elif n == 1 << 28:
                f = 0.8 if dt == "fp32" else 0.57
                goal, text = f * eager, f"<= {f}x eager (issue 3)"
            nbytes = (3 if path == "split" else 2) * n * esz
            out.append((f"centered fwd {dt} 2^{n.bit_length() - 1}",
                        [f"centered {dt} numel={n} {path}"], 0, nbytes, dt, goal, text))
    for B, goal in ((2, 20.0), (4096, 25.0), (1 << 20, 100.0)):
        d = 20
        nbytes = (2 * B * d + 2 * d * d + d) * 4
        out.append((f"FixedHiddenMLP fwd fp32 B={B}",
                    [f"fixed_hidden_mlp_fwd fp32-ieee M={B} d={d} reduce_sum=False save_h2=False"],
                    3 * 2 * B * d * d, nbytes, "fp32-ieee", goal, f"<= {goal:g} us (issue 4)"))
    return out


def rate(prec, a):
    """Matrix rate in FLOP/us for the precision of a case."""
    bf16 = a["cuBLAS mm 8192^3 bfloat16 tf32=False"]["tflops"]
    tf32 = a["cuBLAS mm 8192^3 float32 tf32=True"]["tflops"]
    return {"bf16": bf16, "fp32-ieee": tf32 / 3, "fp32-tf32": tf32}.get(prec, tf32 / 3) * 1e6


def estimate(name, labels, flops, nbytes, prec, gate, a):
    """(estimate_us, launches, facts text, serialized?) for one benchmark case."""
    rows = {(r["kernel"], r["case"]): r for r in gate["rows"]}
    bw = a["d2d copy 1GiB fp32 (read+write)"]["gbps"] * 1e3  # bytes/us
    launches, facts, device, serial, waves = 0, [], 0.0, False, None
    for label in labels:
        op = gate["ops"].get(label)
        if op is None:
            return None, 0, f"(no gate record for {label})", False
        launches += op["triton"] + op["torch"]
        for kernel, first, programs in op["cases"]:
            r = rows.get((kernel, first))
            if r is None:
                facts.append("(not compiled in this gate run)")
                continue
            serial |= any("C7515" in k for k in r.get("known", [])) or \
                r.get("verdict") == "FAIL"
            w = programs / (r["ctas"] * SMS) if programs and r["ctas"] else None
            if r["kernel"] == "_fused_gemm_kernel" and waves is None and programs:
                waves = programs / (r["ctas"] * SMS) if r["ctas"] else None
            facts.append(f"{r['kernel'].strip('_')} {r['config']} {r['regs']} regs "
                         f"{r['smem'] // 1024} KB {r['ctas']} CTA/SM "
                         f"{'' if w is None else f'{w:.2f} waves '}{r['mma']}")
            if r["kernel"] == "_center_persistent_kernel":
                block = int(r["config"].split("/")[0])
                esz = 4 if " fp32 " in f" {name} " else 2
                bw = min(bw, SMS * block * esz / LATENCY_US)
    compute = flops / rate(prec, a) if flops else 0.0
    if compute and waves:
        compute *= math.ceil(waves) / waves
    device = max(compute, nbytes / bw)
    est = max(device, launches * LAUNCH_US) + max(0, launches - 1) * GAP_US
    return est, launches, "; ".join(facts), serial


def render(gate, a, src):
    lines = ["# Static report: H200 benchmark cases (MODEL, NOT MEASURED)", "",
             f"Compile facts: the sm_90 gate (tests/sm90_compile.py), triton "
             f"{gate['triton']}, default configs. Rates: {src} (H200, measured by "
             "shared/gpu_anchors.py). The estimate is a roofline model with a launch floor "
             "(bench/static_report.py says how); no figure here was measured on a GPU. "
             "Replace with bench/gpu_check.sh results when a GPU is lent.", "",
             "Gate verdicts over all its compiles: " + ", ".join(
                 f"{sum(r.get('verdict', 'OK') == v for r in gate['rows'])} {v}"
                 for v in ("OK", "KNOWN", "FAIL")) + " (KNOWN: plain tf32, see "
             "kernels/gemm.py heuristic_config).", "",
             "| case | launches | estimate (model) | goal | goal text | at risk? | compile facts |",
             "|---|---|---|---|---|---|---|"]
    for name, labels, flops, nbytes, prec, goal, text in cases(a):
        est, launches, facts, serial = estimate(name, labels, flops, nbytes, prec, gate, a)
        if est is None:
            lines.append(f"| {name} | ? | ? | - | {text} | ? | {facts} |")
            continue
        goal_s = f"{goal:.1f} us" if goal else "-"
        if goal is None:
            risk = "-"
        elif est > goal:
            risk = f"**yes** ({est / goal:.2f}x the goal)"
        elif est > 0.8 * goal:
            risk = f"tight ({est / goal:.2f}x)"
        else:
            risk = f"no ({est / goal:.2f}x)"
        if serial:
            risk += "; wgmma serialised (C7515)"
        if name.endswith(f"B={1 << 20}"):
            from fastlayers.kernels.halve_until import COUNT_ROWS
            steps = math.ceil(math.ceil((1 << 20) / 64) / COUNT_ROWS)  # 64-row MLP programs
            risk += (f"; its count kernel reads the partial rows in {steps} serial steps of "
                     f"{COUNT_ROWS} (about {steps * LATENCY_US:g} us at {LATENCY_US:g} us of "
                     f"memory latency each, an assumption; not in the estimate)")
        lines.append(f"| {name} | {launches} | {est:.1f} us | {goal_s} | {text} | {risk} | "
                     f"{facts} |")
    lines += ["", "launches: Triton kernels + torch kernels of one call (torch kernels counted "
              "from the aten ops the launchers issue on CPU tensors). Not modelled: serial "
              "loops inside a kernel (FixedHiddenMLP's count kernel at large B: noted in "
              "its row), L2 effects, "
              "tail effects other than wave quantisation of the main GEMM, wgmma "
              "serialisation (flagged, not costed). Host time of the fastlayers side of a "
              "call is measured on CPU by bench/bench_host_time.py."]
    return "\n".join(lines) + "\n"


def record_ops():
    """The gate's launch records (no compiles): per op call, its launches and cases."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sm90_compile
    import sm90_launches
    sm90_compile.setup()
    return sm90_launches.OPS


def run_gate():
    out = Path(tempfile.mkdtemp()) / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extra = os.environ.get("FASTLAYERS_SM90_TRITON_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra, env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py"), "--json",
                    str(out)], cwd=ROOT, env=env, check=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate-json", help="the JSON of a gate run (default: run the gate)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "static-report.md"))
    args = ap.parse_args(argv)
    path = Path(args.gate_json) if args.gate_json else run_gate()
    gate = json.loads(path.read_text())
    if not all("cases" in op for op in gate["ops"].values()):
        gate["ops"] = record_ops()  # an older gate JSON: which compile each call launched
    a, src = anchors()
    text = render(gate, a, src)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
