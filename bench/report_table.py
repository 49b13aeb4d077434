"""Text and Markdown renderings of ``bench.report_stats.summarize``: the terminal table and
the README section (environment, commands, table, plot link, notes)."""
from bench.report_stats import HOST_TIME_RATIO, HOST_WORK_RATIO, flagged

FLAG = "CEILING?"  # printed instead of a share above 100%


def fmt_time(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def fmt_speedup(s):
    """'1.84x [1.70-1.95]', with '<' for slower (upper quartile below 1), '~' where the
    spread straddles 1.0 and '>' for faster."""
    mark = "<" if s["q3"] < 1 else (">" if s["q1"] > 1 else "~")
    return f"{mark}{s['median']:.2f}x [{s['q1']:.2f}-{s['q3']:.2f}]"


def fmt_pct(pct):
    if pct is None:
        return "-"
    return FLAG if flagged(pct) else f"{pct:.1f}%"


def _columns(entries, baselines):
    head = ["op", "shape", "dtype", "pass", "fastlayers"]
    for b in baselines:
        head += [b, f"vs {b}"]
    head += ["%gemm", "%copy", "roofline", "host-bound"]
    body = []
    for e in entries:
        row = [e["op"], e["shape"], e["dtype"], e["pass"], fmt_time(e["ours_ms"])]
        for b in baselines:
            row.append(fmt_time(e["base_ms"].get(b)))
            s = e["speedup"].get(b)
            row.append(fmt_speedup(s) if s else "-")
        row += [fmt_pct(e["roof"][k]) for k in ("gemm", "copy", "roof")]
        row.append("yes" if e["host_bound"] else "")
        body.append(row)
    return head, body


def text_table(entries, baselines):
    """Fixed-width lines: a header, a rule, one line per case."""
    head, body = _columns(entries, baselines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 4 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in body]


def markdown_table(entries, baselines):
    head, body = _columns(entries, baselines)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]


def tally(entries):
    """(faster, slower, unclear): comparisons whose whole spread is above 1, below 1, or
    straddles 1."""
    out = [0, 0, 0]
    for e in entries:
        for s in e["speedup"].values():
            out[0 if s["q1"] > 1 else 1 if s["q3"] < 1 else 2] += 1
    return tuple(out)


def ceilings_text(rows):
    """'copy 24 GB/s, GEMM TFLOP/s bfloat16 0.2, float32 0.03' (as measured at run time)."""
    c = rows[0].get("ceilings", {}) if rows else {}
    rates = ", ".join(f"{k[len('gemm_tflops_'):]} {v:.3g}" for k, v in c.items()
                      if k.startswith("gemm_tflops_"))
    return f"copy {c.get('copy_gbps', 0):.3g} GB/s, GEMM TFLOP/s {rates}"


def environment_line(run, rows):
    c = rows[0].get("ceilings", {}) if rows else {}
    return (f"{run.get('date', '?')} | device {c.get('device', '?')} | cpu {run.get('cpu', '?')} "
            f"({run.get('cores', '?')} cores, torch threads {run.get('threads', '?')}) | "
            f"torch {c.get('torch', '?')} | triton {c.get('triton', '?')} | "
            f"ceilings: {ceilings_text(rows)} | "
            f"fp32 mode {c.get('fp32_mode', '?')}")


def notes(entries):
    """Sentences under the table: the tally, flagged ceilings, host-bound cases."""
    faster, slower, unclear = tally(entries)
    out = [f"fastlayers is faster in {faster}, slower in {slower} and within the spread of "
           f"1.0 in {unclear} of {faster + slower + unclear} comparisons (speedup = baseline "
           f"time / fastlayers time, median over all pairs of rounds, [25th-75th percentile]; "
           f"'>' the whole spread is above 1, '<' below 1, '~' it crosses 1)."]
    bad = [e for e in entries if any(flagged(v) for v in e["roof"].values())]
    if bad:
        names = ", ".join(f"{e['op']} {e['shape']} {e['dtype']} {e['pass']}" for e in bad)
        out.append(f"{FLAG}: a roofline share above 100% (the ceiling was measured low, "
                   f"not printed): {names}.")
    hosts = [e for e in entries if e["host_bound"]]
    names = ", ".join(f"{e['op']} {e['shape']} {e['dtype']} {e['pass']}" for e in hosts)
    out.append(f"Host-bound (fastlayers' per-call time within {HOST_TIME_RATIO}x across "
               f"a {HOST_WORK_RATIO:.0f}x or larger change of work, same op, dtype and pass): "
               f"{names or 'none in this run'}.")
    return out


def markdown_section(entries, baselines, run, rows, *, title, png=None, report_cmd=None):
    """The README section for one run: what, where, how, the table, the plot, the notes."""
    c = rows[0].get("ceilings", {}) if rows else {}
    lines = [f"### {title}", "",
             f"- measured {run.get('date', '?')} on {c.get('device', '?')}"
             + (f" ({run['gpu']})" if run.get("gpu") else "")
             + f"; CPU {run.get('cpu', '?')}, {run.get('cores', '?')} cores, torch threads "
             f"{run.get('threads', '?')}",
             f"- torch {c.get('torch', '?')}, triton {c.get('triton', '?')}, python "
             f"{run.get('python', '?')}; fp32 matmul mode {c.get('fp32_mode', '?')}; "
             f"{run.get('rounds', '?')} rounds of ~{run.get('round_s', '?')} s per case",
             f"- ceilings measured in the same run: {ceilings_text(rows)}",
             "- benchmarks: `" + run.get("command", "?") + "`"]
    if report_cmd:
        lines.append(f"- this section and the plot: `{report_cmd}`")
    lines += [""] + markdown_table(entries, baselines) + [""]
    lines += [n + "\n" for n in notes(entries)]
    if png:
        lines.append(f"![speedups and roofline shares]({png})")
    return lines
