"""Print (and plot) a benchmark run: ``python -m bench.report results.json [--png out.png]``.

``results.json`` is pytest-benchmark's ``--benchmark-json`` output of ``pytest bench/``.
One row per case (op, shape, dtype, pass): fastlayers' per-call median, each baseline's,
the speedup over each baseline (baseline time / ours: > 1 means fastlayers is faster) and
fastlayers' share of the ceilings measured in the same run (GEMM rate, copy bandwidth).
"""
import argparse
import json
import sys
from collections import defaultdict

OURS = "fastlayers"


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = [b["extra_info"] for b in data.get("benchmarks", []) if "op" in b.get("extra_info", {})]
    return rows, data.get("machine_info", {})


def group(rows):
    """{(op, shape, dtype, pass): {variant: row}} in first-seen order."""
    cases = defaultdict(dict)
    for r in rows:
        key = (r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["pass_"])
        cases[key][r["variant"]] = r
    return cases


def _fmt_ms(ms):
    return f"{ms * 1e3:9.1f}us" if ms < 1 else f"{ms:9.3f}ms"


def table(cases):
    """The report's lines: a header, then one line per case."""
    baselines = sorted({v for c in cases.values() for v in c if v != OURS})
    head = f"{'op':18s} {'shape':18s} {'dtype':9s} {'pass':8s} {'ours':>11s}"
    head += "".join(f" {b[:10]:>11s} {'x' + b[:6]:>8s}" for b in baselines)
    head += f" {'%gemm':>6s} {'%copy':>6s}"
    lines = [head, "-" * len(head)]
    for (op, shape, dtype, pass_), variants in cases.items():
        ours = variants.get(OURS)
        line = f"{op:18s} {shape:18s} {dtype:9s} {pass_:8s} "
        line += _fmt_ms(ours["median_ms"]).rjust(11) if ours else f"{'-':>11s}"
        for b in baselines:
            base = variants.get(b)
            if base is None:
                line += f" {'-':>11s} {'-':>8s}"
                continue
            speedup = base["median_ms"] / ours["median_ms"] if ours else float("nan")
            line += " " + _fmt_ms(base["median_ms"]).rjust(11) + f" {speedup:7.2f}x"
        pg = ours.get("pct_gemm_rate") if ours else None
        pc = ours.get("pct_copy_bw") if ours else None
        line += f" {pg:6.1f}" if pg is not None else f" {'-':>6s}"
        line += f" {pc:6.1f}" if pc is not None else f" {'-':>6s}"
        lines.append(line)
    return lines


def ceilings_line(rows):
    if not rows:
        return "no fastlayers benchmark rows found"
    c = rows[0].get("ceilings", {})
    rates = ", ".join(f"{k.split('_')[-1]} {v:.3g} TFLOP/s" for k, v in c.items()
                      if k.startswith("gemm_tflops_"))
    return (f"device {c.get('device')} | torch {c.get('torch')} | triton {c.get('triton')} | "
            f"copy {c.get('copy_gbps', 0):.0f} GB/s | GEMM {rates} | fp32 mode {c.get('fp32_mode')}")


def plot(cases, path):
    """Per op: speedup over each baseline (bars, log scale) and % of roofline (markers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({k[0] for k in cases})
    fig, axes = plt.subplots(len(ops), 1, figsize=(13, 3.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        keys = [k for k in cases if k[0] == op and OURS in cases[k]]
        baselines = sorted({v for k in keys for v in cases[k] if v != OURS})
        width = 0.8 / max(1, len(baselines))
        for j, b in enumerate(baselines):
            xs, ys = [], []
            for i, k in enumerate(keys):
                if b in cases[k]:
                    xs.append(i + j * width)
                    ys.append(cases[k][b]["median_ms"] / cases[k][OURS]["median_ms"])
            ax.bar(xs, ys, width, label=f"speedup vs {b}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup (x)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{k[1]}\n{k[2]} {k[3]}" for k in keys], fontsize=7)
        ax.set_title(op)
        roof = ax.twinx()
        for metric, marker in (("pct_gemm_rate", "o"), ("pct_copy_bw", "s")):
            pts = [(i, cases[k][OURS].get(metric)) for i, k in enumerate(keys)]
            pts = [(i, v) for i, v in pts if v is not None]
            if pts:
                roof.plot([p[0] + 0.4 - width / 2 for p in pts], [p[1] for p in pts], marker,
                          color="black", label=f"% {metric[4:]}")
        roof.set_ylim(0, 110)
        roof.set_ylabel("% of ceiling")
        ax.legend(loc="upper left", fontsize=7)
        roof.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--png", help="also draw the plot to this PNG file")
    p.add_argument("--op", help="only this op")
    args = p.parse_args(argv)
    rows, _ = load_rows(args.results)
    if args.op:
        rows = [r for r in rows if r["op"] == args.op]
    print(ceilings_line(rows))
    cases = group(rows)
    for line in table(cases):
        print(line)
    if args.png:
        plot(cases, args.png)
        print(f"plot written to {args.png}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
