"""bench.report on a saved benchmark JSON (tests/report_fixture.json): speedups with their
spread, a slower-than-baseline case, ceilings raised by a baseline's own rate, shares above
100% flagged instead of printed, host-bound detection, the Markdown section and the figure.

The fixture's per-round times are chosen so every expected figure can be worked out by
hand (see the comments in each test)."""
import json
import os
import re

import pytest

from bench import report
from bench.report_stats import (OURS, baselines_of, group, host_bound, load, roofline, speedup,
                                summarize)
from bench.report_table import FLAG, text_table

FIXTURE = os.path.join(os.path.dirname(__file__), "report_fixture.json")


@pytest.fixture(scope="module")
def loaded():
    rows, run = load(FIXTURE)
    return rows, run, summarize(rows), baselines_of(group(rows))


def _entry(entries, op, shape):
    return next(e for e in entries if e["op"] == op and e["shape"] == shape)


def test_speedup_is_median_and_iqr_over_pairs_of_rounds():
    # ours 1 ms every round, eager 1.8/2.0/2.2 ms: the 9 pair ratios are 1.8, 2.0, 2.2 three
    # times each -> median 2.0, 25th percentile 1.8, 75th 2.2
    s = speedup({"median_ms": 1.0, "rounds_ms": [1.0, 1.0, 1.0]},
                {"median_ms": 2.0, "rounds_ms": [2.2, 1.8, 2.0]})
    assert s == pytest.approx({"median": 2.0, "q1": 1.8, "q3": 2.2})
    # asymmetric rounds: ours 1 and 2 ms, baseline 3 ms -> ratios 3.0, 1.5
    s = speedup({"median_ms": 1.5, "rounds_ms": [1.0, 2.0]}, {"median_ms": 3.0, "rounds_ms": [3.0]})
    assert s == pytest.approx({"median": 2.25, "q1": 1.875, "q3": 2.625})
    # no per-round data: the ratio of the medians, no spread
    s = speedup({"median_ms": 4.0}, {"median_ms": 1.0})
    assert s == {"median": 0.25, "q1": 0.25, "q3": 0.25}


def test_legacy_json_rounds_come_from_pytest_benchmark_stats(loaded):
    rows, _, entries, _ = loaded
    legacy = [r for r in rows if r["op"] == "fixed_hidden_mlp"]
    # stats.data holds round times of inner_calls=10 calls each, in seconds
    assert legacy[0]["rounds_ms"] == pytest.approx([0.4, 0.4, 0.4])
    assert _entry(entries, "fixed_hidden_mlp", "2x20")["speedup"]["seed"]["median"] == \
        pytest.approx(0.5)


def test_ceiling_is_the_fastest_torch_rate_of_the_run(loaded):
    _, _, entries, _ = loaded
    # measured GEMM ceiling 0.01 TFLOP/s, but the compile baseline reached 0.04: that is the
    # ceiling, so ours (0.02) is at 50%, not 200%
    assert _entry(entries, "linear_relu", "1000x1000x10")["roof"]["gemm"] == pytest.approx(50.0)
    # 4x the flops in 1.2 ms = 0.0667 TFLOP/s > 0.04: above 100%, the ceiling is wrong
    assert _entry(entries, "linear_relu", "4000x1000x10")["roof"]["gemm"] > 100
    # copy ceiling = max(large copy 20, same-size copy 25, eager 10 GB/s) = 25; ours 30 GB/s
    assert _entry(entries, "centered", "1000000")["roof"]["copy"] == pytest.approx(120.0)


def test_roofline_share_is_the_larger_of_gemm_and_copy_shares():
    ours = {"tflops": 1.0, "gbps": 50.0, "ceilings": {"copy_gbps": 60.0}}  # eager: 80
    r = roofline({OURS: ours, "eager": {"gbps": 80.0}}, gemm_ceiling=4.0)
    assert r == pytest.approx({"gemm": 25.0, "copy": 62.5, "roof": 62.5})


def test_host_bound_cases_are_the_flat_ones(loaded):
    _, _, entries, _ = loaded
    flat = {(e["op"], e["shape"]) for e in entries if e["host_bound"]}
    # 4x the flops in 1.2x the time; the single-size ops cannot be judged and are not flagged
    assert flat == {("linear_relu", "1000x1000x10"), ("linear_relu", "4000x1000x10")}


def test_host_bound_needs_flat_time_over_a_4x_change_of_work():
    def row(n, ms, dtype="float32"):
        return {"op": "op", "variant": OURS, "pass_": "fwd", "dtype": dtype, "shape": [n],
                "nbytes": 8 * n, "median_ms": ms}
    # time grows with the work: not host-bound
    assert host_bound(group([row(1000, 1.0), row(4000, 3.0)])) == set()
    # flat, but only 2x the work: cannot tell, not flagged
    assert host_bound(group([row(1000, 1.0), row(2000, 1.0)])) == set()
    # flat over 4x the work, but across dtypes: different series, not flagged
    assert host_bound(group([row(1000, 1.0), row(4000, 1.0, "bfloat16")])) == set()
    flat = host_bound(group([row(1000, 1.0), row(4000, 1.4), row(64000, 20.0)]))
    assert flat == {("op", "1000", "float32", "fwd"), ("op", "4000", "float32", "fwd")}


def test_table_text(loaded):
    _, _, entries, baselines = loaded
    lines = text_table(entries, baselines)
    assert baselines == ["eager", "compile", "seed"]
    head = lines[0].split()
    assert head[:5] == ["op", "shape", "dtype", "pass", "fastlayers"]
    assert "host-bound" in head and "roofline" in head
    by_case = {tuple(line.split()[:2]): line for line in lines[2:]}
    lr = by_case[("linear_relu", "1000x1000x10")]
    assert ">2.00x [1.80-2.20]" in lr  # faster than eager, with its spread
    assert "<0.50x [0.50-0.50]" in lr  # slower than torch.compile
    assert "50.0%" in lr and lr.rstrip().endswith("yes")
    assert "<0.50x" in by_case[("fixed_hidden_mlp", "2x20")]
    assert FLAG in by_case[("centered", "1000000")]
    assert FLAG in by_case[("linear_relu", "4000x1000x10")]
    # the case without a fastlayers row is listed with its baseline's time only
    assert "5.0 us" in by_case[("host_time", "2x64x8")]
    # no printed share exceeds 100%
    shares = [float(p) for line in lines for p in re.findall(r"(\d+(?:\.\d+)?)%", line)]
    assert shares and max(shares) <= 100.0


def test_markdown_section_and_cli(loaded, tmp_path, capsys):
    png, md = tmp_path / "r.png", tmp_path / "r.md"
    assert report.main([FIXTURE, "--png", str(png), "--markdown", str(md),
                        "--png-link", "bench/results/r.png", "--title", "CPU test"]) == 0
    out = capsys.readouterr().out
    assert "fastlayers is faster in 3, slower in 2" in out
    text = md.read_text()
    assert text.startswith("### CPU test\n")
    assert "Fixture CPU, 2 cores, torch threads 1" in text
    assert "`pytest bench/ --benchmark-only --benchmark-json=r.json`" in text
    assert "python -m bench.report " in text
    assert "![speedups and roofline shares](bench/results/r.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5  # header + one row per case
    assert "| centered | 1000000 | float32 | fwd | 100.0 us | 300.0 us | >3.00x [3.00-3.00] |" \
        in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_is_drawn(loaded, tmp_path):
    from bench.report_plot import SLOWER_HATCH, plot

    _, _, entries, baselines = loaded
    path = tmp_path / "fig.png"
    fig = plot(entries, baselines, str(path), title="t")
    assert path.stat().st_size > 10_000
    # two axes (speedups, roofline strip) per op that has a fastlayers row; host_time has none
    titles = [ax.get_title(loc="left").split("\n")[0] for ax in fig.axes[0::2]]
    assert titles == ["linear_relu", "centered", "fixed_hidden_mlp"]
    assert len(fig.axes) == 6
    speed = {t: ax for t, ax in zip(titles, fig.axes[0::2])}
    roof = dict(zip(titles, fig.axes[1::2]))
    bars = {t: [p for p in ax.patches] for t, ax in speed.items()}
    assert [len(bars[t]) for t in titles] == [3, 1, 1]  # one bar per comparison
    # the shared log axis is centred on 1.0 and the same in every panel
    lims = {ax.get_ylim() for ax in speed.values()}
    assert len(lims) == 1
    lo, hi = lims.pop()
    assert speed["centered"].get_yscale() == "log" and lo * hi == pytest.approx(1.0)
    # bars start at 1.0; slower ones (0.5x vs compile, 0.5x vs seed) hang below it, hatched
    for t in titles:
        for p in bars[t]:
            assert p.get_y() == pytest.approx(1.0)
            assert (p.get_height() < 0) == (p.get_hatch() == SLOWER_HATCH)
    assert sum(p.get_height() < 0 for t in titles for p in bars[t]) == 2
    # printed values on the bars
    texts = [x.get_text() for x in speed["linear_relu"].texts]
    assert "2.00x eager" in texts and "0.50x compile" in texts
    # roofline strip: flagged shares are drawn at 100 and labelled, never as a number > 100
    labels = [x.get_text() for x in roof["linear_relu"].texts]
    assert labels == ["50%", "ceiling?"]
    assert [p.get_height() for p in roof["centered"].patches] == [100]
    assert json.dumps(labels)  # labels are plain strings
