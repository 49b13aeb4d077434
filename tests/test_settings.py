"""fastlayers.settings: one parser for every FASTLAYERS_* switch, the README's table checked
against it, per-thread backends, and TRITON_INTERPRET set too late. Settings choose paths
but run no op, so these tests need no ``backend`` fixture."""
import asyncio
import pathlib
import re
import subprocess
import sys
import threading

import pytest

import fastlayers
from fastlayers import _backend, settings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FLAGS = [v for v, (_a, kind, _d) in settings.SETTINGS.items() if kind == "flag"]


@pytest.mark.parametrize("value, want", [
    ("1", True), ("true", True), ("TRUE", True), (" Yes ", True), ("on", True), ("On", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False),
    ("", False), (None, False),
])
def test_one_flag_rule(value, want):
    for var in FLAGS:
        assert settings.parse_flag(var, value) is want


@pytest.mark.parametrize("value", ["2", "enable", "y", "-1", "truee", "0.0"])
def test_other_flag_values_are_refused_naming_the_variable(value):
    """Issue 12, case 6: FASTLAYERS_AUTOTUNE=false used to enable autotuning."""
    for var in FLAGS:
        with pytest.raises(ValueError, match=var):
            settings.parse_flag(var, value)


def test_bad_flag_in_the_environment_fails_the_import():
    out = subprocess.run([sys.executable, "-c", "import fastlayers"], capture_output=True,
                         text=True, timeout=300,
                         env={**__import__("os").environ, "FASTLAYERS_AUTOTUNE": "maybe"})
    assert out.returncode != 0 and "FASTLAYERS_AUTOTUNE" in out.stderr and "maybe" in out.stderr


def test_false_words_really_turn_flags_off():
    env = {"FASTLAYERS_AUTOTUNE": "false", "FASTLAYERS_TMA": "Off", "FASTLAYERS_CHECK": "no",
           "FASTLAYERS_BACKEND": "Torch"}
    parsed = {}
    for var, (attr, kind, default) in settings.SETTINGS.items():
        parsed[attr] = settings._parse(var, kind, default, env.get(var))
    assert parsed["autotune"] is False and parsed["tma"] is False and parsed["check"] is False
    assert parsed["backend"] == "torch"


def test_backend_names_are_case_insensitive_everywhere():
    before = fastlayers.get_backend()
    try:
        assert fastlayers.set_backend("TORCH") == before
        assert fastlayers.get_backend() == "torch"
        with fastlayers.use_backend("Auto"):
            assert fastlayers.get_backend() == "auto"
    finally:
        fastlayers.set_backend(before)
    with pytest.raises(ValueError, match="FASTLAYERS_BACKEND"):
        fastlayers.set_backend("gpu")


def test_update_validates_and_reaches_the_kernels():
    from fastlayers.kernels import runtime
    previous = settings.update(tma=True, autotune=True)
    try:
        assert runtime.tma_enabled() and runtime.autotuning()
    finally:
        settings.update(**previous)
    assert not runtime.tma_enabled() and not runtime.autotuning()
    with pytest.raises(TypeError, match="autotune"):
        settings.update(autotune="yes")
    with pytest.raises(KeyError, match="no setting"):
        settings.update(speed=11)


def test_use_backend_is_per_thread_and_leaves_the_default():
    """Issue 12, case 6: use_backend was process-wide."""
    default = fastlayers.get_backend()
    seen, inside, release = {}, threading.Event(), threading.Event()

    def worker():
        with fastlayers.use_backend("torch"):
            inside.set()
            release.wait(30)
            seen["worker"] = fastlayers.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(30)
    seen["main"] = fastlayers.get_backend()   # while the worker holds its override
    seen["other"] = []
    t2 = threading.Thread(target=lambda: seen["other"].append(fastlayers.get_backend()))
    t2.start()
    t2.join()
    release.set()
    t.join()
    assert seen == {"worker": "torch", "main": default, "other": [default]}
    assert settings.backend == default


def test_use_backend_is_per_asyncio_task():
    async def task(name, delay):
        with fastlayers.use_backend(name):
            await asyncio.sleep(delay)
            return fastlayers.get_backend()

    async def both():
        return await asyncio.gather(task("torch", 0.02), task("auto", 0.01))

    assert asyncio.run(both()) == ["torch", "auto"]


def test_triton_interpret_set_after_import_is_a_fastlayers_error(monkeypatch):
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backend.TRITON_ERROR is not None:
        pytest.skip(f"triton is not installed here ({_backend.TRITON_ERROR})")
    import torch
    with fastlayers.use_backend("triton"), pytest.raises(RuntimeError,
                                                          match="set after triton was imported"):
        fastlayers.functional.centered(torch.randn(3))


def test_readme_table_is_the_settings_module():
    text = README.read_text()
    section = text[text.index("## Settings"):]
    section = section[:section.index("\n## ", 4)]
    rows = re.findall(r"^\| `(FASTLAYERS_\w+)` \| ([^|]+) \| ([^|]+) \|", section, re.M)
    assert [r[0] for r in rows] == list(settings.SETTINGS), "README rows != settings.SETTINGS"
    for var, values, default in rows:
        _attr, kind, want = settings.SETTINGS[var]
        if kind == "flag":
            assert values.strip() == "a flag" and default.strip() == ("on" if want else "off")
        elif kind == "backend":
            assert default.strip() == f"`{want}`"
            assert all(f"`{b}`" in values for b in settings.BACKENDS)
    assert "os.environ" not in "".join(
        p.read_text() for p in (README.parent / "fastlayers").rglob("*.py")
        if p.name != "settings.py" and p.name != "_backend.py"), \
        "a FASTLAYERS_* switch is read outside fastlayers/settings.py"


def test_triton_interpret_set_after_import_in_a_fresh_process():
    """The real sequence: import, then set TRITON_INTERPRET=1, then ask for the kernels."""
    if _backend.TRITON_ERROR is not None:
        pytest.skip(f"triton is not installed here ({_backend.TRITON_ERROR})")
    code = ("import os, torch, fastlayers\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "with fastlayers.use_backend('triton'):\n"
            "    fastlayers.functional.centered(torch.randn(3))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode != 0
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stderr, out.stderr


def test_a_failed_update_changes_nothing():
    """Every value is validated before any is set: a bad one raises and leaves the
    earlier, valid ones of the same call unapplied."""
    before = settings.as_dict()
    with pytest.raises(TypeError, match="autotune"):
        settings.update(check=True, backend="torch", autotune="yes")
    with pytest.raises(TypeError, match="tour_fail"):
        settings.update(check=True, tour_fail=5)
    with pytest.raises(ValueError, match="FASTLAYERS_BACKEND"):
        settings.update(check=True, backend="cuda")
    assert settings.as_dict() == before


def test_tour_section_names_are_case_insensitive():
    assert settings.read("FASTLAYERS_TOUR_FAIL", {"FASTLAYERS_TOUR_FAIL": " Layers "}) == "layers"
    assert settings.read("FASTLAYERS_TOUR_FAIL", {"FASTLAYERS_TOUR_FAIL": "ALL"}) == "all"
    assert settings.read("FASTLAYERS_TOUR_FAIL", {}) is None
    previous = settings.update(tour_fail="Init")
    try:
        assert settings.tour_fail == "init"
    finally:
        settings.update(**previous)
