"""The mutation catalogue (tools/mutants.py) still plants its bugs: every mutant's original
text occurs exactly once in its file and the mutated file parses, and every test selection
names existing tests. What ``python tools/mutate.py --check`` checks, through mutate.py's own
functions, so a refactor that moves a mutant's code fails here until the mutant is
re-targeted (a mutant that does not apply tests nothing, and the report would be stale)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import mutants as catalogue
import mutate

CURATED = mutate.all_mutants(generated=0)
HOW = ("; the code moved: rewrite this mutant in tools/mutants.py so it plants the same bug "
       "in the current code (`python tools/mutate.py --check` lists every one)")


@pytest.mark.parametrize("mutant", CURATED, ids=[m["id"] for m in CURATED])
def test_mutant_applies_exactly_once(mutant):
    problem = mutate.apply_problem(mutant)
    assert problem is None, problem + HOW


@pytest.mark.parametrize("mutant", CURATED, ids=[m["id"] for m in CURATED])
def test_mutant_test_selection_exists(mutant):
    problem = mutate.selection_problem(mutant)
    assert problem is None, problem


def test_generated_flips_apply():
    flips = mutate.all_mutants(generated=catalogue.GENERATED_COUNT)[len(CURATED):]
    assert len(flips) == catalogue.GENERATED_COUNT
    for m in flips:
        assert mutate.apply_problem(m) is None and mutate.selection_problem(m) is None, m["id"]


def test_ids_are_unique():
    ids = [m["id"] for m in mutate.all_mutants()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_the_check_finds_rot(tmp_path):
    """apply_problem is not vacuous: missing, repeated and syntax-breaking rewrites, and
    a missing file, are reported (an absolute path replaces the repository root)."""
    src = tmp_path / "m.py"
    src.write_text("def f(x):\n    return x < 1 or x < 1\n\n\ndef g(y):\n    return y + 2\n")

    def problem(find, replace="", file=src):
        return mutate.apply_problem({"id": "t", "file": str(file), "find": find,
                                     "replace": replace})

    assert problem("return y + 2", "return y - 2") is None
    assert "occurs 0 times" in problem("return y + 3", "return y")
    assert "occurs 2 times" in problem("x < 1", "x <= 1")
    assert "does not parse" in problem("return y + 2", "return y +")
    assert "equals the original" in problem("return y + 2", "return y + 2")
    assert "does not exist" in problem("x", "y", file=tmp_path / "gone.py")
    sel = {"id": "t", "file": "f.py", "tests": ["tests/test_mutants_apply.py::no_such_test"]}
    assert "defines no test no_such_test" in mutate.selection_problem(sel)
    sel["tests"] = ["tests/test_mutants_apply.py::test_ids_are_unique", "tests/nope.py"]
    assert "tests/nope.py does not exist" in mutate.selection_problem(sel)
