"""``python -m fastlayers``: the tour runs every section and exits 0; a failing check (forced
with FASTLAYERS_TOUR_FAIL) exits 1; bad arguments exit 2. Plus the runner's comparisons."""
import io
import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from fastlayers import _backend, tour
from fastlayers.tour import runner
from fastlayers.tour.sections import SECTIONS

from conftest import HAS_CUDA, HAS_TRITON

TITLES = [f"[{i}/{len(SECTIONS)}] {title} ({key})" for i, (key, title, _) in
          enumerate(SECTIONS, 1)]


def _run(*args, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if k != tour.FAIL_ENV}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastlayers", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def _section_lines(stdout, key):
    """The lines printed inside section ``key``."""
    lines, inside = [], False
    for line in stdout.splitlines():
        if line.startswith("["):
            inside = line.endswith(f"({key})")
        elif inside:
            lines.append(line)
    return lines


def test_quick_tour_passes_every_section():
    result = _run("--quick", "--device", "cpu")
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for title in TITLES:
        assert title in out
    assert "device cpu" in out and "quick run" in out
    assert f"{len(SECTIONS)} sections" in out and "all passed" in out and "FAIL" not in out
    for key, _, _ in SECTIONS:  # every section ran checks, not just its header
        assert any(line.startswith("  ok ") for line in _section_lines(out, key)), key
    assert " ms" in out
    # speed: warm medians of several calls, on their own lines, never a cold call per check
    timed = [line for line in out.splitlines() if line.startswith("       time ")]
    assert len(timed) == 2 and all("medians of 10 warm calls each" in line for line in timed)
    assert not any(" ms" in line for line in out.splitlines() if line.startswith("  ok "))


def test_a_failing_check_makes_the_exit_status_non_zero():
    result = _run("--quick", "--device", "cpu", env={tour.FAIL_ENV: "init"})
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    init_lines = _section_lines(out, "init")
    assert init_lines and all(not line.startswith("  ok ") for line in init_lines)
    assert any(line.startswith("  FAIL init.normal_(net, std=0.01)") for line in init_lines)
    others = [line for key, _, _ in SECTIONS if key != "init" for line in _section_lines(out, key)]
    assert not any(line.startswith("  FAIL") for line in others)
    assert f"{sum(line.startswith('  FAIL') for line in init_lines)} FAILED" in out


def test_bad_arguments_exit_2(monkeypatch, capsys):
    """In process (the same ``main`` the subprocess runs): argparse and the tour's checks."""
    from fastlayers.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--device", "tpu"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    monkeypatch.setenv(tour.FAIL_ENV, "no-such-section")
    assert main(["--quick"]) == 2 and "names no section" in capsys.readouterr().err
    monkeypatch.delenv(tour.FAIL_ENV)
    if not HAS_CUDA:
        assert main(["--device", "cuda", "--quick"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    if HAS_TRITON:  # a backend that cannot run on the device: triton on a CPU, no interpreter
        monkeypatch.setattr(_backend, "interpreting", lambda: False)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with fastlayers.use_backend("triton"):
            assert main(["--device", "cpu", "--quick"]) == 2
        assert capsys.readouterr().err.startswith(
            "error: fastlayers: FASTLAYERS_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("var, value", [("FASTLAYERS_BACKEND", "bogus"),
                                        ("FASTLAYERS_CHECK", "maybe")])
def test_a_bad_setting_is_one_line_and_exit_2(var, value):
    """A bad FASTLAYERS_* value: the tour says which in one line and exits 2 (bad
    arguments), no traceback; importing the library with it still raises ValueError."""
    done = _run("--quick", env={var: value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"python -m fastlayers: {var}") and value in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    imported = subprocess.run([sys.executable, "-c", "import fastlayers"], capture_output=True,
                              text=True, env={**os.environ, var: value}, timeout=120)
    assert imported.returncode == 1 and "ValueError" in imported.stderr


def test_every_check_of_the_tour_can_fail(monkeypatch):
    """FASTLAYERS_TOUR_FAIL=all perturbs every result: each check must then FAIL (a check
    that stays ok could not catch a wrong answer)."""
    monkeypatch.setenv(tour.FAIL_ENV, "all")
    out = io.StringIO()
    assert tour.main("auto", quick=True, out=out) == 1
    lines = out.getvalue().splitlines()
    checks = [line for line in lines if line.startswith(("  ok ", "  FAIL "))]
    assert checks and all(line.startswith("  FAIL ") for line in checks), \
        [line for line in checks if line.startswith("  ok ")]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed here")
def test_quick_tour_through_the_triton_kernels():
    """In process, every fused op on the Triton path (the interpreter on CPU): checks then
    compare within CLOSE_RTOL instead of bitwise."""
    out = io.StringIO()
    with fastlayers.use_backend("triton"):
        status = tour.main("auto", quick=True, out=out)
    text = out.getvalue()
    assert status == 0, text[-3000:]
    assert "fused ops run triton" in text and "rel err" in text and "all passed" in text
    assert "not timed (the fused ops run in Triton's CPU interpreter" in text  # no misleading times
    assert "medians of" not in text


def _tour(fail_section=None):
    return tour.Tour(torch.device("cpu"), quick=True, out=io.StringIO(), fail_section=fail_section)


def test_runner_compares_and_counts():
    t = _tour()
    t.section_key = "x"
    a = torch.randn(4, 3)
    assert t.compare("same", lambda: a.clone(), lambda: a)
    assert not t.compare("one ulp off, bitwise", lambda: a.nextafter(a + 1), lambda: a)
    assert t.compare("one ulp off, tolerant", lambda: a.nextafter(a + 1), lambda: a, exact=False)
    assert not t.compare("10% off, tolerant", lambda: a * 1.1, lambda: a, exact=False)
    assert not t.compare("shape", lambda: a[:2], lambda: a)
    assert t.compare("containers", lambda: {"k": [a, (1, "s")]}, lambda: {"k": [a, (1, "s")]})
    assert not t.compare("keys", lambda: {"k": a}, lambda: {"j": a})
    assert t.expect("fact", lambda: True) and not t.expect("false fact", lambda: False)
    assert (t.checks, t.failures) == (9, 5)
    text = t.out.getvalue()
    assert text.count("  FAIL ") == 5 and "rel err" in text


def test_runner_sabotage_and_crashing_sections():
    t = _tour(fail_section="b")

    def boom(t):
        raise RuntimeError("section exploded")

    sections = [("a", "A", lambda t: t.compare("x", lambda: 1.0, lambda: 1.0)),
                ("b", "B", lambda t: t.compare("y", lambda: torch.ones(2), lambda: torch.ones(2))),
                ("c", "C", boom),
                ("d", "D", lambda t: t.expect("still runs", lambda: True))]
    assert t.run(sections) == 1
    text = t.out.getvalue()
    assert (t.checks, t.failures) == (4, 2)
    assert "FAIL c raised RuntimeError: section exploded" in text and "still runs" in text
    assert "4 checks, 2 FAILED" in text


def test_progress_is_quiet_for_short_steps_and_shown_for_long_ones(monkeypatch):
    t = _tour()
    for i in range(1, 11):
        t.progress(i, 10, "short")
    assert t.out.getvalue() == ""
    clock = iter(range(0, 1000, 1))  # one "second" per call
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(clock)))
    for i in range(1, 11):
        t.progress(i, 10, "long")
    lines = t.out.getvalue().splitlines()
    assert lines and lines[-1].strip().startswith("long: 10/10")


def test_resolve_device():
    assert tour.resolve_device("cpu") == torch.device("cpu")
    assert tour.resolve_device("auto") == fastlayers.device.try_gpu()


def test_timing_prints_warm_medians_not_the_cold_call(monkeypatch):
    """Fake clock: each call advances it by its scripted duration. The cold first calls
    (warm-up) and the outliers must not show; the medians and their ratio must."""
    now = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])

    def scripted(durations):
        it = iter(durations)

        def call():
            now[0] += next(it)
        return call
    ours = scripted([9.0, 5.0] + [0.004, 0.001, 0.002, 0.003, 0.100])  # 2 warm-up calls
    seed = scripted([7.0, 3.0] + [0.006, 0.009, 0.005, 0.007, 0.008])
    t = _tour()
    assert t.timing("step", ours, seed, repeat=5, warmup=2) == pytest.approx((0.003, 0.007))
    line = t.out.getvalue().strip()
    assert line == ("time step: fastlayers 3.000 ms, seed 7.000 ms (medians of 5 warm calls "
                    "each; seed / fastlayers = 2.33; the fused ops run plain torch on this "
                    "device)")
    assert (t.checks, t.failures) == (0, 0)  # shown, not judged
