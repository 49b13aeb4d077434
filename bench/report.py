"""Print (and plot) a benchmark run:
``python -m bench.report results.json [--png out.png] [--markdown out.md]``.

``results.json`` is pytest-benchmark's ``--benchmark-json`` output of ``pytest bench/``.
One row per case (op, shape, dtype, pass): fastlayers' per-call median, each baseline's,
the speedup over each baseline (baseline time / ours, > 1: fastlayers is faster; median
over all pairs of rounds with the interquartile spread), the roofline share against
ceilings measured with torch in the same run (a share above 100% is flagged, not printed)
and whether the case is host-bound. ``--markdown`` writes the same as a README section.
See bench/report_stats.py for the definitions, bench/report_plot.py for the figure.
"""
import argparse
import shlex
import sys

from bench.report_stats import OURS, baselines_of, group, load, summarize  # noqa: F401 (OURS: re-exported)
from bench.report_table import environment_line, markdown_section, notes, text_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--png", help="also draw the plot to this PNG file")
    p.add_argument("--markdown", help="also write a README section (Markdown) to this file")
    p.add_argument("--png-link", help="the plot's path as the Markdown should link it "
                   "(default: --png as given)")
    p.add_argument("--title", help="the section's and the plot's title")
    p.add_argument("--op", help="only this op")
    args = p.parse_args(argv)
    rows, run = load(args.results)
    if args.op:
        rows = [r for r in rows if r["op"] == args.op]
    if not rows:
        print(f"no fastlayers benchmark rows in {args.results}")
        return 1
    entries = summarize(rows)
    baselines = baselines_of(group(rows))
    title = args.title or f"{rows[0].get('device', '?')}: {run.get('date', '?')}"
    print(environment_line(run, rows))
    for line in text_table(entries, baselines):
        print(line)
    for line in notes(entries):
        print(line)
    if args.png:
        from bench.report_plot import plot  # matplotlib only when a plot is asked for

        plot(entries, baselines, args.png,
             title=f"{title}  |  {run.get('date', '?')}  |  fastlayers vs torch, same run")
        print(f"plot written to {args.png}")
    if args.markdown:
        cmd = "python -m bench.report " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
        lines = markdown_section(entries, baselines, run, rows, title=title,
                                 png=args.png_link or args.png, report_cmd=cmd)
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
