"""The report's figure: per op, grouped bars of fastlayers' speedup over each baseline of
every case on ONE log axis shared by all ops and centred on 1.0 (bars grow up from the 1.0
line when fastlayers is faster, down when slower; faster bars are green, slower ones red
and hatched, pale where the spread crosses 1.0), the interquartile spread as error bars and
the value printed at each tip (with the baseline's name where an op has several); under
each op a strip with the roofline share (0-100%; a share above 100% is drawn as a hatched
'ceiling?' bar, never as a number). Host-bound cases have grey italic labels. Ops with few
cases share a row."""
import math

from bench.report_stats import flagged

FASTER = ["#1a9850", "#66bd63", "#a6d96a", "#006837", "#d9ef8b"]
SLOWER = ["#d73027", "#f46d43", "#fdae61", "#a50026", "#fee08b"]
SLOWER_HATCH = "////"
ROOF_COLOR = "#4575b4"
FLAG_COLOR = "#fdb863"
UNCLEAR_ALPHA = 0.4
ROW_CASES = 12  # cases per figure row before an op gets a row of its own


def _limit(entries, room):
    """Half-width of the shared log axis: covers every bar (a spread may be clipped) times
    ``room`` for the labels, at least 2x, a power of two."""
    worst = 2.0
    for e in entries:
        for s in e["speedup"].values():
            if s["median"] > 0:
                worst = max(worst, s["median"], 1 / s["median"])
    return 2 ** math.ceil(math.log2(worst * room))


def _ticks(limit):
    k = int(round(math.log2(limit)))
    step = 1 if k <= 4 else 2
    return [2.0 ** i for i in range(-k, k + 1) if i % step == 0]


def _tick_label(v):
    return f"{v:g}x" if v >= 1 else f"1/{1 / v:g}x"


def _case_label(e):
    return f"{e['shape']}\n{e['dtype']}\n{e['pass']}" + ("\nhost-bound" if e["host_bound"] else "")


def _rows(ops, counts):
    """Pack ops (first fit, in order) into figure rows of at most ROW_CASES cases."""
    rows = []
    span = {op: max(counts[op], 1.5) for op in ops}
    for op in ops:
        for row in rows:
            if sum(span[o] for o in row) + span[op] <= ROW_CASES:
                row.append(op)
                break
        else:
            rows.append([op])
    return rows


def _draw_op(ax, roof, cases, names, limit, ticks, first_in_row):
    width = 0.8 / max(1, len(names))
    for i, e in enumerate(cases):
        for j, b in enumerate(names):
            s = e["speedup"].get(b)
            if s is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            slower = s["median"] < 1
            colors = SLOWER if slower else FASTER
            unclear = s["q1"] <= 1 <= s["q3"]  # the spread crosses 1.0: drawn pale
            ax.bar(x, s["median"] - 1, width * 0.9, bottom=1, color=colors[j % len(colors)],
                   alpha=UNCLEAR_ALPHA if unclear else 1.0, edgecolor="black", linewidth=0.5,
                   hatch=SLOWER_HATCH if slower else None)
            ax.errorbar(x, s["median"], yerr=[[s["median"] - s["q1"]], [s["q3"] - s["median"]]],
                        fmt="none", ecolor="black", elinewidth=0.9, capsize=2)
            tip = min(max(s["median"], 1.15 / limit), limit / 1.15)
            if len(names) == 1:  # the value past the bar's tip
                y, va, rotation, label = (tip / 1.08 if slower else tip * 1.08,
                                          "top" if slower else "bottom", 0,
                                          f"{s['median']:.2f}x")
            else:  # several baselines: a vertical label naming the baseline, above the 1.0
                # line for a slower bar (a long label under a deep bar would leave the axes)
                y, va, rotation, label = (1.08 if slower else tip * 1.08, "bottom", 90,
                                          f"{s['median']:.2f}x {b}")
            ax.text(x, y, label, ha="center", va=va, fontsize=7 if len(names) == 1 else 6.5,
                    fontweight="bold", rotation=rotation,
                    color="#a50026" if slower else "#00441b",
                    bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none",
                              alpha=0.8))
        r = e["roof"]["roof"]
        if r is not None:
            bad = flagged(r)
            roof.bar(i, 100 if bad else max(r, 0.0), 0.5, color=FLAG_COLOR if bad else ROOF_COLOR,
                     hatch="xx" if bad else None, edgecolor="black", linewidth=0.5)
            roof.text(i, (100 if bad else r) + 5, "ceiling?" if bad else f"{r:.0f}%",
                      ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1.3)
    ax.set_yscale("log")
    ax.set_ylim(1 / limit, limit)
    ax.set_yticks(ticks)
    ax.set_yticklabels([_tick_label(t) for t in ticks] if first_in_row else [])
    ax.minorticks_off()
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.tick_params(labelbottom=False, bottom=False)
    roof.set_ylim(0, 135)
    roof.set_yticks([0, 50, 100])
    roof.set_yticklabels(["0", "50", "100%"] if first_in_row else [])
    roof.axhline(100, color="grey", linewidth=0.6, linestyle="--")
    roof.set_xticks(range(len(cases)))
    roof.set_xticklabels([_case_label(e) for e in cases], fontsize=7)
    for tick, e in zip(roof.get_xticklabels(), cases):
        if e["host_bound"]:
            tick.set_color("#777777")
            tick.set_style("italic")
    if first_in_row:
        ax.set_ylabel("speedup\n(baseline time / ours)", fontsize=8)
        roof.set_ylabel("roofline", fontsize=8)


def plot(entries, baselines, path, title=None):
    """Draw the figure to ``path`` (PNG); returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shown = [e for e in entries if e["speedup"]]
    ops = list(dict.fromkeys(e["op"] for e in shown))
    counts = {op: sum(e["op"] == op for e in shown) for op in ops}
    rows = _rows(ops, counts) or [[]]
    several = any(len(e["speedup"]) > 1 for e in shown)  # vertical labels need more room
    limit = _limit(shown, 2.0 if several else 1.3)
    ticks = _ticks(limit)
    span = {op: max(counts[op], 1.5) for op in ops}  # a one-case panel still needs room
    widest = max([sum(span[o] for o in row) for row in rows] + [4])
    fig = plt.figure(figsize=(1.5 + 1.05 * widest, 1.8 + 4.4 * len(rows)))
    outer = fig.add_gridspec(len(rows), 1, hspace=0.38)
    for r, row in enumerate(rows):
        ratios = [span[o] for o in row]
        if sum(ratios) < widest:  # an empty cell keeps this row's bars as wide as the others
            ratios.append(widest - sum(ratios))
        cells = outer[r].subgridspec(2, len(ratios), height_ratios=[3, 1], hspace=0.08,
                                     width_ratios=ratios, wspace=0.12)
        for c, op in enumerate(row):
            cases = [e for e in shown if e["op"] == op]
            names = [b for b in baselines if any(b in e["speedup"] for e in cases)]
            ax = fig.add_subplot(cells[0, c])
            roof = fig.add_subplot(cells[1, c], sharex=ax)
            _draw_op(ax, roof, cases, names, limit, ticks, c == 0)
            ax.set_title(f"{op}\nvs {', '.join(names)}", loc="left", fontsize=8,
                         fontweight="bold")
    handles = [Patch(facecolor=FASTER[0], edgecolor="black", label="fastlayers faster"),
               Patch(facecolor=SLOWER[0], hatch=SLOWER_HATCH, edgecolor="black",
                     label="fastlayers slower"),
               Patch(facecolor=FASTER[0], alpha=UNCLEAR_ALPHA, edgecolor="black",
                     label="pale: spread crosses 1.0 (no clear difference)"),
               Patch(facecolor="white", edgecolor="black",
                     label="error bar: 25th-75th pct of per-round ratios"),
               Patch(facecolor=ROOF_COLOR, label="% of roofline (torch's ceilings, same run)"),
               Patch(facecolor=FLAG_COLOR, hatch="xx", label="above 100%: ceiling measured low")]
    height, width = fig.get_figheight(), fig.get_figwidth()
    ncol = 5 if width >= 14 else 3 if width >= 10 else 2
    fig.legend(handles=handles, loc="upper center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=11, fontweight="bold")
    fig.subplots_adjust(top=1 - 1.45 / height, bottom=0.75 / height, left=0.95 / width,
                        right=1 - 0.15 / width)
    fig.savefig(path, dpi=100)
    return fig
