"""Mutation testing for fastlayers: plant one bug at a time in fastlayers/ and kernels/,
run the tests that cover it, and report which bugs the suite catches.

    python tools/mutate.py                      # every curated mutant + generated flips
    python tools/mutate.py --only gemm-relu     # mutants whose id starts with these
    python tools/mutate.py --list               # ids, files and test selections
    python tools/mutate.py --check              # each mutant applies exactly once (no tests)

``--check`` is also run by CI, through :func:`apply_problem` and :func:`selection_problem`
(tests/test_mutants_apply.py): a refactor that moves a mutant's code fails CI until the
mutant is re-targeted, so the catalogue cannot silently test nothing.

Mutants: the curated list in tools/mutants.py (plausible bugs: flipped comparisons,
dropped masks, missing checks, swapped arguments) plus comparison-operator flips generated
from the AST of the files in ``GENERATED_FROM`` (``--generated N`` of them, a fixed sample).
Each mutant rewrites one exact piece of one file; its tests run as
``python -m pytest -x -q -p no:cacheprovider <selection>`` with a timeout (``--timeout``).

Outcomes: caught (the tests failed), survived (they passed: a hole in the suite, or an
equivalent mutant), timeout (NOT counted as caught: on this slow CPU it usually means the
selection is too large, not that the mutant hangs), error (the mutant could not be
applied). The report (``--report``, default tools/mutation-report.md) lists
every mutant and the survivors' diffs.

The original file is restored after each mutant, also on Ctrl-C or SIGTERM; a copy is kept
in tools/.mutate-backup/ while a mutant is planted, and restored on the next start if a
run was killed hard. Not for CI (minutes to an hour on a CPU).
"""
import argparse
import ast
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import mutants as catalogue
from mutation_report import write_report

BACKUP = ROOT / "tools" / ".mutate-backup"
EQUIVALENT = {m["id"]: m["equivalent"] for m in catalogue.MUTANTS if m.get("equivalent")}
NOTES = {m["id"]: m["note"] for m in catalogue.MUTANTS if m.get("note")}


# ------------------------------------------------------------------------ planting
def restore_backup() -> None:
    """Put back any file a killed run left mutated."""
    manifest = BACKUP / "manifest.json"
    if manifest.exists():
        rel = json.loads(manifest.read_text())["file"]
        shutil.copyfile(BACKUP / "original", ROOT / rel)
        print(f"restored {rel} from a previous run's backup", file=sys.stderr)
    shutil.rmtree(BACKUP, ignore_errors=True)


class Planted:
    """Context manager: ``mutant`` applied to its file, the original restored on exit."""

    def __init__(self, mutant):
        self.m = mutant
        self.path = ROOT / mutant["file"]

    def mutated_text(self, original: str) -> str:
        find, repl = self.m["find"], self.m["replace"]
        n = original.count(find)
        if n != 1:
            raise ValueError(f"{self.m['id']}: {find!r} occurs {n} times in {self.m['file']}")
        return original.replace(find, repl)

    def __enter__(self):
        self.original = self.path.read_text()
        text = self.mutated_text(self.original)
        BACKUP.mkdir(exist_ok=True)
        (BACKUP / "original").write_text(self.original)
        (BACKUP / "manifest.json").write_text(json.dumps({"file": self.m["file"]}))
        self.path.write_text(text)
        self.diff = "".join(difflib.unified_diff(
            self.original.splitlines(True), text.splitlines(True),
            f"a/{self.m['file']}", f"b/{self.m['file']}", n=1))
        return self

    def __exit__(self, *exc):
        self.path.write_text(self.original)
        shutil.rmtree(BACKUP, ignore_errors=True)
        return False


def apply_problem(mutant) -> str | None:
    """Why ``mutant`` cannot be planted, or None when it can: its ``find`` text occurs
    exactly once in its file, ``replace`` changes it, and the mutated file still parses (a
    mutant that breaks the syntax is "caught" by any import, which proves nothing)."""
    path = ROOT / mutant["file"]
    if not path.is_file():
        return f"{mutant['id']}: {mutant['file']} does not exist"
    original = path.read_text()
    try:
        text = Planted(mutant).mutated_text(original)
    except ValueError as exc:
        return str(exc)
    if text == original:
        return f"{mutant['id']}: the replacement equals the original text"
    if path.suffix == ".py":
        try:
            ast.parse(text)
        except SyntaxError as exc:
            return (f"{mutant['id']}: the mutated {mutant['file']} does not parse "
                    f"(line {exc.lineno}: {exc.msg})")
    return None


def _top_level_names(test_file: Path) -> set:
    tree = ast.parse(test_file.read_text())
    return {n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def selection_problem(mutant) -> str | None:
    """Why ``mutant``'s test selection is stale, or None: every entry must name an existing
    test file, and ``file::name`` a test function or class defined at its top level."""
    if not mutant.get("tests"):
        return f"{mutant['id']}: no tests (add {mutant['file']} to TESTS_FOR in tools/mutants.py)"
    for entry in mutant["tests"]:
        rel, _, name = entry.partition("::")
        path = ROOT / rel
        if not path.is_file():
            return f"{mutant['id']}: test file {rel} does not exist"
        name = name.split("::")[0].split("[")[0]
        if name and name not in _top_level_names(path):
            return f"{mutant['id']}: {rel} defines no test {name}"
    return None


def all_mutants(generated: int = catalogue.GENERATED_COUNT) -> list[dict]:
    """The curated mutants of tools/mutants.py and ``generated`` comparison flips, each with
    its test selection (``tests``; TESTS_FOR[file] unless the mutant names its own)."""
    todo = [dict(m) for m in catalogue.MUTANTS] + generated_mutants(generated)
    for m in todo:
        m.setdefault("tests", catalogue.TESTS_FOR.get(m["file"], []))
    return todo


# ------------------------------------------------------------------------ generated flips
FLIPS = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "=="}
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


def generated_mutants(count: int):
    """Up to ``count`` comparison flips (< <-> <=, > <-> >=, == <-> !=), spread evenly over
    the comparisons of the files in catalogue.GENERATED_FROM. Each rewrites the whole line,
    so it applies only where that line is unique in its file."""
    found = []
    for rel, tests in catalogue.GENERATED_FROM.items():
        text = (ROOT / rel).read_text()
        lines = text.splitlines(True)
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Compare) and len(node.ops) == 1
                    and type(node.ops[0]) in FLIPS and node.lineno == node.end_lineno):
                continue
            line = lines[node.lineno - 1]
            seg = ast.get_source_segment(text, node)
            op = SYMBOL[type(node.ops[0])]
            left = ast.get_source_segment(text, node.left)
            right = ast.get_source_segment(text, node.comparators[0])
            new = f"{left} {FLIPS[type(node.ops[0])]} {right}"
            if seg != f"{left} {op} {right}" or line.count(seg) != 1 or text.count(line) != 1:
                continue  # unusual spacing or a repeated line: skip rather than guess
            found.append(dict(id=f"gen-{Path(rel).stem}-L{node.lineno}", file=rel, find=line,
                              replace=line.replace(seg, new), tests=tests,
                              why=f"generated: {seg} -> {new}"))
    seen = {}
    for m in found:  # two comparisons on one line: L79, L79b
        n = seen[m["id"]] = seen.get(m["id"], 0) + 1
        if n > 1:
            m["id"] += "bcdefgh"[n - 2]
    found.sort(key=lambda m: m["id"])
    if count >= len(found):
        return found
    step = len(found) / max(count, 1)
    return [found[int(i * step)] for i in range(count)]


# ------------------------------------------------------------------------ running
def pytest_args(mutant):
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts="]
    args += list(mutant["tests"])
    if mutant.get("k"):
        args += ["-k", mutant["k"]]
    return args


def imports_elsewhere():
    """None when the tests import fastlayers and its kernels from this tree; else why not.
    (An editable install of another checkout would run every mutant's tests against
    unmutated code: bogus outcomes.) Asked in a fresh python, so this process and its
    forked children never import fastlayers before a mutant is planted."""
    code = ("import fastlayers, fastlayers.kernels.gemm as g; "
            "print(fastlayers.__file__); print(g.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True).stdout.split()
    if len(out) != 2 or not all(Path(f).resolve().is_relative_to(ROOT) for f in out):
        return (f"mutate: the tests would import fastlayers from {out or 'nowhere'}, not "
                f"from {ROOT}; run `pip install -e .` in this tree (its own venv) first")
    return None


def preload() -> None:
    """Import the heavy dependencies once in this process (not fastlayers: the children
    import the mutated files fresh), so each forked test run skips those imports."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py does
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        pass


def _child(args, log_path) -> None:
    """In a forked child: run pytest with output to ``log_path``; never returns."""
    code = 4
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(ROOT)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import pytest
        code = int(pytest.main(args))
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_tests(mutant, timeout: float, fork: bool):
    """(outcome, seconds, evidence) of the mutant's tests: a forked child of this
    preloaded process (``fork``) or a fresh ``python -m pytest``."""
    args = pytest_args(mutant)
    log = BACKUP / "pytest.log"
    start = time.monotonic()
    if fork:
        pid = os.fork()
        if pid == 0:
            os.setsid()
            _child(args, str(log))
        deadline = start + timeout
        code = None
        try:
            while code is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                elif time.monotonic() > deadline:
                    break
                else:
                    time.sleep(0.2)
        finally:
            if code is None:  # timed out or interrupted: end the child's whole group
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        if code is None:
            return "timeout", time.monotonic() - start, f"no result within {timeout:.0f} s"
        out = log.read_text(errors="replace") if log.exists() else ""
    else:
        proc = subprocess.Popen([sys.executable, "-m", "pytest"] + args, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timeout", time.monotonic() - start, f"no result within {timeout:.0f} s"
        code = proc.returncode
    secs = time.monotonic() - start
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [""]
    if code == 0:
        return "survived", secs, last[0]
    if code in (1, 3):  # tests failed / internal error (e.g. the mutant breaks an import)
        failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        return "caught", secs, (failed[:1] or last)[0]
    return "error", secs, f"pytest exit {code}: {last[0]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="run mutants whose id starts with one of these")
    p.add_argument("--generated", type=int, default=catalogue.GENERATED_COUNT,
                   help="how many generated comparison flips to add (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    p.add_argument("--spawn", action="store_true",
                   help="a fresh python per mutant instead of forking a preloaded one")
    p.add_argument("--report", default=str(ROOT / "tools" / "mutation-report.md"))
    p.add_argument("--update", action="store_true",
                   help="keep the results of mutants not run now from the last run's "
                        "<report>.json (to re-run survivors after adding tests)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true",
                   help="check that every mutant applies exactly once, run no tests")
    args = p.parse_args(argv)
    restore_backup()

    todo = all_mutants(args.generated)
    known = {m["id"] for m in todo}
    if args.only:
        todo = [m for m in todo if any(m["id"].startswith(o) for o in args.only)]
    if args.list or args.check:
        bad = 0
        for m in todo:
            status = ""
            if args.check:
                problem = apply_problem(m) or selection_problem(m)
                if problem:
                    status, bad = f"  <-- {problem}", bad + 1
            print(f"{m['id']:32} {m['file']:32} {' '.join(m['tests'])}"
                  f"{' -k ' + repr(m['k']) if m.get('k') else ''}{status}")
        print(f"{len(todo)} mutants" + (f", {bad} do not apply" if args.check else ""))
        return 1 if bad else 0

    problem = imports_elsewhere()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # SIGTERM -> KeyboardInterrupt, so the finally blocks restore the file.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    fork = hasattr(os, "fork") and not args.spawn
    if fork:
        preload()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    report = Path(args.report)
    saved = report.with_suffix(".json")
    previous = json.loads(saved.read_text()) if args.update and saved.exists() else []
    rerun = {m["id"] for m in todo}
    results = [r for r in previous if r["id"] not in rerun and r["id"] in known]
    try:
        for i, m in enumerate(todo, 1):
            try:
                with Planted(m) as planted:
                    outcome, secs, evidence = run_tests(m, args.timeout, fork)
                diff = planted.diff
            except (ValueError, FileNotFoundError) as exc:  # rotted: see --check
                outcome, secs, evidence, diff = "error", 0.0, str(exc), ""
            results.append(dict(id=m["id"], file=m["file"], why=m.get("why", ""),
                                equivalent=m.get("equivalent"), outcome=outcome, secs=secs,
                                evidence=evidence, diff=diff))
            print(f"[{i}/{len(todo)}] {outcome:8} {secs:5.0f}s {m['id']}: {evidence}", flush=True)
            for r in results:  # the current catalogue's verdict on equivalence
                r["equivalent"] = EQUIVALENT.get(r["id"], r.get("equivalent"))
            write_report(report, results, started, sys.argv[1:] if argv is None else argv,
                         NOTES)
            saved.write_text(json.dumps(results, indent=1))
    except KeyboardInterrupt:
        print("interrupted: the mutated file was restored; partial report written",
              file=sys.stderr)
        return 130
    survived = sum(r["outcome"] == "survived" and not r.get("equivalent") for r in results)
    print(f"report: {report} ({survived} non-equivalent survivors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
