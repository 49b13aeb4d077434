"""The numbers behind ``python -m bench.report``: cases, speedups with their spread,
roofline shares against ceilings that are upper bounds, and host-bound cases.

A *case* is (op, shape, dtype, pass); its *variants* are fastlayers (``OURS``) and the
baselines measured in the same run (eager, cublaslt, compile, seed, ...). Everything is
read from each result's ``extra_info`` (see bench/conftest.py), so benchmark files added
later are reported without changes here.

Speedup of fastlayers over a baseline: per-call times are known per round
(``rounds_ms``). Rounds of two variants run one after the other, not side by side, so no
pairing of rounds is privileged: the speedup is the median of baseline_round / ours_round
over all pairs of rounds, and its spread is the 25th-75th percentile (interquartile range)
of those pairs. > 1 means fastlayers is faster. Without per-round data (older JSON) it is
the ratio of the medians, with no spread.

Roofline share: attained / min(peak GEMM rate, copy bandwidth x arithmetic intensity)
= max(% of GEMM ceiling, % of copy ceiling). A ceiling is the fastest rate torch itself
reached in the run: for GEMMs the larger of the measured square-GEMM rate for the dtype
and any baseline's own rate at that dtype; for bytes the larger of the large copy, the
copy of the case's own byte count and the case's baselines' GB/s. A share above 100%
means the ceiling was measured low (on a noisy machine, an unlucky moment): the report
flags it instead of printing it.

Host-bound: a case whose fastlayers per-call time is flat across sizes, i.e. another size
of the same op/dtype/pass with at least ``HOST_WORK_RATIO`` times the work takes at most
``HOST_TIME_RATIO`` times as long (both cases are flagged).
"""
import json
import math
from collections import defaultdict

OURS = "fastlayers"
HOST_WORK_RATIO = 4.0
HOST_TIME_RATIO = 1.5


def load(path):
    """(rows, run): the extra_info of every suite result, and the run's environment
    (``fastlayers_run`` written by bench/conftest.py, {} for older JSON)."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        per_round = (b.get("stats") or {}).get("data")
        if "rounds_ms" not in info and per_round and info.get("inner_calls"):
            info["rounds_ms"] = [d / info["inner_calls"] * 1e3 for d in per_round]
        rows.append(info)
    run = dict(data.get("fastlayers_run") or {})
    run.setdefault("date", data.get("datetime", "?"))
    return rows, run


def shape_str(shape):
    return "x".join(map(str, shape))


def group(rows):
    """{(op, shape, dtype, pass): {variant: row}} in first-seen order."""
    cases = defaultdict(dict)
    for r in rows:
        shape = r.get("shape", ())
        key = (r["op"], shape if isinstance(shape, str) else shape_str(shape),
               r.get("dtype", "-"), r.get("pass_", "-"))
        cases[key][r.get("variant", "?")] = r
    return dict(cases)


def _quantile(sorted_xs, q):
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def speedup(ours, base):
    """{"median", "q1", "q3"} of baseline time / our time over all pairs of rounds
    (q1 = q3 = median when a row has no per-round data)."""
    a, b = ours.get("rounds_ms"), base.get("rounds_ms")
    if not a or not b:
        m = base["median_ms"] / ours["median_ms"]
        return {"median": m, "q1": m, "q3": m}
    ratios = sorted(y / x for x in a for y in b)
    return {"median": _quantile(ratios, 0.5), "q1": _quantile(ratios, 0.25),
            "q3": _quantile(ratios, 0.75)}


def baselines_of(cases):
    """Every baseline name in the run, in first-seen order."""
    seen = {}
    for variants in cases.values():
        for v in variants:
            if v != OURS:
                seen.setdefault(v)
    return list(seen)


def gemm_ceilings(rows):
    """{dtype: TFLOP/s}: the best of the measured GEMM ceiling and every baseline's rate."""
    out = {}
    for r in rows:
        c = r.get("ceilings", {}).get(f"gemm_tflops_{r['dtype']}")
        if c:
            out[r["dtype"]] = max(out.get(r["dtype"], 0.0), c)
        if r["variant"] != OURS and r.get("tflops"):
            out[r["dtype"]] = max(out.get(r["dtype"], 0.0), r["tflops"])
    return out


def roofline(variants, gemm_ceiling):
    """{"gemm", "copy", "roof"}: our % of each ceiling and the roofline share (their max);
    None where the case has no flops / bytes. Values may exceed 100 (see ``flagged``)."""
    ours = variants[OURS]
    out = {"gemm": None, "copy": None}
    if ours.get("tflops") and gemm_ceiling:
        out["gemm"] = 100 * ours["tflops"] / gemm_ceiling
    if ours.get("gbps"):
        copy = max([ours.get("ceilings", {}).get("copy_gbps", 0.0),
                    ours.get("copy_gbps_same_size", 0.0)]
                   + [r.get("gbps", 0.0) for v, r in variants.items() if v != OURS])
        if copy:
            out["copy"] = 100 * ours["gbps"] / copy
    shares = [v for v in out.values() if v is not None]
    out["roof"] = max(shares) if shares else None
    return out


def flagged(pct):
    """True where a printed share would exceed 100%: the ceiling, not the kernel, is wrong."""
    return pct is not None and pct > 100.0


def _work(row):
    shape = row.get("shape") or [1]
    return row.get("flops") or row.get("nbytes") or (
        math.prod(shape) if not isinstance(shape, str) else 1)


def host_bound(cases):
    """The set of case keys whose fastlayers per-call time is flat across sizes."""
    series = defaultdict(list)
    for key, variants in cases.items():
        if OURS in variants:
            op, _, dtype, pass_ = key
            series[(op, dtype, pass_)].append((_work(variants[OURS]),
                                               variants[OURS]["median_ms"], key))
    out = set()
    for members in series.values():
        for w_small, t_small, k_small in members:
            for w_big, t_big, k_big in members:
                if w_big >= HOST_WORK_RATIO * w_small and t_big <= HOST_TIME_RATIO * t_small:
                    out.update((k_small, k_big))
    return out


def summarize(rows):
    """Everything the table and the plot need: a list of dicts, one per case, in run order."""
    cases = group(rows)
    ceil = gemm_ceilings(rows)
    hosts = host_bound(cases)
    out = []
    for key, variants in cases.items():
        op, shape, dtype, pass_ = key
        ours = variants.get(OURS)
        entry = {"key": key, "op": op, "shape": shape, "dtype": dtype, "pass": pass_,
                 "ours_ms": ours["median_ms"] if ours else None,
                 "base_ms": {v: r["median_ms"] for v, r in variants.items() if v != OURS},
                 "speedup": {}, "roof": {"gemm": None, "copy": None, "roof": None},
                 "host_bound": key in hosts}
        if ours:
            entry["speedup"] = {v: speedup(ours, r) for v, r in variants.items() if v != OURS}
            entry["roof"] = roofline(variants, ceil.get(dtype))
        out.append(entry)
    return out
