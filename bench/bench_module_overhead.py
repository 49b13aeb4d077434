"""One fastlayers module call vs the torch modules it replaces, on the CPU path, as PAIRED
ratios: LinearReLU vs nn.Linear + nn.ReLU, CenteredLayer vs ``x - x.mean()``, at a tiny
and a medium size, with and without grad. Issue 10's goal: every ratio <= 1.0.

CenteredLayer has two baselines, each its own paired ratio: the bare expression
``x - x.mean()`` (the fields ``ratio``, ``ours_us``, ``theirs_us``, ...: no module call on
torch's side) and the seed's own CenteredLayer module (``fastlayers.tour.seed``, forward
``X - X.mean()``; the same fields under ``vs_module``): a module call against a module
call, like for like. (Against the bare expression our side alone pays torch's
``nn.Module.__call__``; the ratio of the two figures shows that cost.) A third pair,
``floor``, bounds what any module can reach against the bare expression: a module whose
forward is only the fastest exact stock-op formula (``torch.sub(x, x.sum(), alpha=1/n)``,
no checks, no dispatch) against ``x - x.mean()``.

Each round alternates ~1 ms chunks of calls of ours and of torch's (which side starts
alternates between rounds) and takes the ratio of the two sums; the figure is the median
over rounds, so load on a shared machine hits both sides of a pair alike. One intra-op
thread (see :func:`one_thread`). The ratios (median, min, max, every round) go to the
benchmark JSON's ``extra_info``; the benchmark's own timing is ours alone.

    python -m pytest bench/bench_module_overhead.py --benchmark-only -p no:cacheprovider
"""
import contextlib
import statistics
import time

import pytest
import torch

import fastlayers
from fastlayers.tour.seed import CenteredLayer as SeedCenteredLayer

ROUNDS = 41
ROUND_S = 0.04  # both sides, per round
CHUNK_S = 0.001  # one side's calls between switches


@contextlib.contextmanager
def one_thread():
    """Both sides on one intra-op thread: on a small machine shared with other jobs, an op
    that wakes a second pool thread waits for the scheduler (milliseconds seen here on a
    2x64x8 F.linear), noise unrelated to either side's own cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _time(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def paired_ratio(ours, theirs, rounds=ROUNDS, round_s=ROUND_S, chunk_s=CHUNK_S):
    """Median over ``rounds`` of (time per call of ours) / (theirs), interleaved; also
    both per-call medians in microseconds. Within a round the two sides alternate in
    chunks of ~``chunk_s`` (ours first in even rounds, theirs first in odd ones), so a
    preemption by another job lands on both sides alike. Both are warmed up first."""
    for _ in range(20):
        ours()
        theirs()
    per = max(_time(ours, 50), _time(theirs, 50))
    inner = max(1, int(chunk_s / max(per, 1e-7)))
    chunks = max(1, int(round_s / (2 * inner * per)))
    ratios, t_ours, t_theirs = [], [], []
    for r in range(rounds):
        a = b = 0.0
        for _ in range(chunks):
            if r % 2:
                b += _time(theirs, inner)
                a += _time(ours, inner)
            else:
                a += _time(ours, inner)
                b += _time(theirs, inner)
        ratios.append(a / b)
        t_ours.append(a / chunks)
        t_theirs.append(b / chunks)
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                ratios=[round(x, 4) for x in ratios], rounds=rounds, inner_calls=inner,
                chunks_per_round=chunks, ours_us=statistics.median(t_ours) * 1e6,
                theirs_us=statistics.median(t_theirs) * 1e6)


def _linear_pair(M, K, N, grad):
    torch.manual_seed(0)
    ours = fastlayers.LinearReLU(K, N)
    lin, act = torch.nn.Linear(K, N), torch.nn.ReLU()
    with torch.no_grad():
        lin.weight.copy_(ours.weight)
        lin.bias.copy_(ours.bias)
    x = torch.randn(M, K)
    torch.testing.assert_close(ours(x), act(lin(x)))  # the same function
    if not grad:
        ours.requires_grad_(False)
        lin.requires_grad_(False)
    return (lambda: ours(x)), (lambda: act(lin(x)))


class FormulaOnly(torch.nn.Module):
    """The floor: a module with no checks and no dispatch around the one-op formula
    (exact for a power-of-two element count, as at the sizes here)."""

    def forward(self, x):
        return torch.sub(x, x.sum(), alpha=1.0 / x.numel())


def _centered_pair(shape, grad, seed_module=False, floor=False):
    """(ours, theirs): theirs is ``x - x.mean()``, or the seed's CenteredLayer module;
    ``floor``: (FormulaOnly, ``x - x.mean()``)."""
    torch.manual_seed(0)
    ours = FormulaOnly() if floor else fastlayers.CenteredLayer()
    x = torch.randn(*shape) + 0.5
    if grad:
        x.requires_grad_(True)
    assert torch.equal(ours(x), x - x.mean())  # the same function, bitwise on the CPU
    if seed_module:
        seed = SeedCenteredLayer()
        return (lambda: ours(x)), (lambda: seed(x))
    return (lambda: ours(x)), (lambda: x - x.mean())


SEED_BASELINE = "seed CenteredLayer module"
FLOOR_BASELINE = "x - x.mean(), for a formula-only module (the floor)"
CASES = [
    ("LinearReLU", "2x64x8", lambda g: _linear_pair(2, 64, 8, g)),
    ("LinearReLU", "256x256x256", lambda g: _linear_pair(256, 256, 256, g)),
    ("CenteredLayer", "4x128", lambda g, **kw: _centered_pair((4, 128), g, **kw)),
    ("CenteredLayer", "256x1024", lambda g, **kw: _centered_pair((256, 1024), g, **kw)),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("module, size, make", CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_module_overhead(benchmark, module, size, make, grad):
    if fastlayers.backend_info()["devices"]["cpu"]["path"] != "torch":
        pytest.skip("measures the CPU (torch) path; FASTLAYERS_BACKEND sends CPU elsewhere")
    ours, theirs = make(grad)
    baseline = "nn.Linear+nn.ReLU" if module == "LinearReLU" else "x - x.mean()"
    with torch.set_grad_enabled(grad), one_thread():
        pair = paired_ratio(ours, theirs)
        benchmark.extra_info.update(module=module, size=size, grad=grad, device="cpu",
                                    baseline=baseline, goal="ratio <= 1.0", **pair)
        pairs = [(baseline, pair)]
        if module == "CenteredLayer":
            ours, seed = make(grad, seed_module=True)
            vs_module = paired_ratio(ours, seed)
            benchmark.extra_info["vs_module"] = dict(baseline=SEED_BASELINE, **vs_module)
            pairs.append((SEED_BASELINE, vs_module))
            floor = paired_ratio(*make(grad, floor=True))
            benchmark.extra_info["floor"] = dict(baseline=FLOOR_BASELINE, **floor)
            pairs.append((FLOOR_BASELINE, floor))
        benchmark.pedantic(ours, rounds=5, iterations=pair["inner_calls"], warmup_rounds=1)
    for name, p in pairs:
        print(f"\n{module} {size} grad={grad}: ours/torch = {p['ratio']:.3f} vs {name} "
              f"(rounds {p['ratio_min']:.3f}-{p['ratio_max']:.3f}; "
              f"{p['ours_us']:.1f} us vs {p['theirs_us']:.1f} us per call)")
