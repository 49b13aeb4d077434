"""The tour's runner: ``Tour`` (checks, progress, sections) and ``main``.

Every section runs the seed's own plain-torch code (:mod:`fastlayers.tour.seed`) and the
fastlayers way of doing the same thing on the chosen device, compares the two and prints
one line per check. Speed is shown on separate ``time`` lines (:meth:`Tour.timing`): the
median of several warm calls of each side, never a first (cold) call, and not judged. The
exit status is 0 when every check passed, 1 when any failed, 2 for bad arguments.

Checks: tensors must be equal bitwise where both sides run the same torch kernels (the
torch path on CPU) and within ``CLOSE_RTOL`` relative error (Frobenius norm) where the
fused Triton kernels run (a GPU, or ``FASTLAYERS_BACKEND=triton`` with
``TRITON_INTERPRET=1``).

``FASTLAYERS_TOUR_FAIL=<section>`` (e.g. ``init``; ``all`` for every section) perturbs the
fastlayers side of every check in that section before comparing, to show (and test) that
a failing check is reported and turns the exit status non-zero.
"""
import statistics
import sys
import time
import traceback
from typing import Callable, List, Optional, Tuple

import torch

import fastlayers
from fastlayers import _backend, settings

CLOSE_RTOL = 2e-5
FAIL_ENV = "FASTLAYERS_TOUR_FAIL"


class Tour:
    """Runs sections, records checks, prints progress; ``failures`` counts failed checks.

    device: where tensors and models live. quick: the seed's small sizes only (long steps
    are shortened). out: the stream to print to. fail_section: see FASTLAYERS_TOUR_FAIL.
    """

    def __init__(self, device: torch.device, quick: bool, out=sys.stdout,
                 fail_section: Optional[str] = None):
        self.device, self.quick, self.out = device, quick, out
        self.fail_section = fail_section
        self.section_key = None
        self.checks = self.failures = 0
        self._progress = None
        self.exact = not _backend.use_triton(torch.empty(0, device=device))

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ checks
    def _sabotaged(self) -> bool:
        return self.fail_section in (self.section_key, "all")

    def _record(self, label: str, ok: bool, detail: str) -> bool:
        self.checks += 1
        self.failures += not ok
        mark = "ok  " if ok else "FAIL"
        self.say(f"  {mark} {label:<62} {detail}")
        return ok

    def compare(self, label: str, ours: Callable, seed: Callable, exact: Optional[bool] = None,
                rtol: float = CLOSE_RTOL):
        """Run ``ours()`` (fastlayers) and ``seed()`` (the seed's code) and compare results:
        tensors, numbers, strings, or lists/tuples/dicts of those. exact: force bitwise
        (True) or tolerant (False, relative error <= rtol) comparison; default: bitwise on
        the torch path."""
        got = ours()
        want = seed()
        if self._sabotaged():
            got = _perturb(got)
        exact = self.exact if exact is None else exact
        ok, detail = _match(got, want, exact, rtol)
        return self._record(label, ok, detail)

    def expect(self, label: str, fact: Callable[[], bool]):
        """Check a fact about the fastlayers side (``fact()`` must return True)."""
        ok = bool(fact())
        if self._sabotaged():
            ok = not ok
        return self._record(label, ok, "yes" if ok else "no")

    def timing(self, label: str, ours: Callable, seed: Callable, repeat: int = 20,
               warmup: int = 3) -> Optional[Tuple[float, float]]:
        """Show how fast ``ours()`` (fastlayers) and ``seed()`` run: ``warmup`` untimed calls
        of each, then ``repeat`` timed calls of each, alternating (a noisy machine drifts
        alike for both), each ended by a device synchronisation on CUDA; prints the two
        medians and their ratio. Shown, not judged: no check is recorded. Where the fused ops
        run in Triton's CPU interpreter (a correctness tool) nothing is timed. Returns the
        medians in seconds ``(ours, seed)``, or None when not timed."""
        if self.device.type == "cpu" and not self.exact:
            self.say(f"       time {label}: not timed (the fused ops run in Triton's CPU "
                     f"interpreter here, a correctness tool)")
            return None
        cuda = self.device.type == "cuda"

        def once(fn) -> float:
            if cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        for _ in range(warmup):
            ours()
            seed()
        times_ours, times_seed = [], []
        for i in range(repeat):
            times_ours.append(once(ours))
            times_seed.append(once(seed))
            self.progress(i + 1, repeat, f"timing {label}")
        o, s = statistics.median(times_ours), statistics.median(times_seed)
        note = "; the fused ops run plain torch on this device" if self.exact else ""
        self.say(f"       time {label}: fastlayers {o * 1e3:.3f} ms, seed {s * 1e3:.3f} ms "
                 f"(medians of {repeat} warm calls each; seed / fastlayers = "
                 f"{s / o if o > 0 else float('inf'):.2f}{note})")
        return o, s

    def show(self, text: str) -> None:
        """Print what the seed would print (indented), e.g. a module or a table."""
        for line in str(text).splitlines():
            self.say(f"       | {line}")

    def progress(self, done: int, total: int, label: str) -> None:
        """Progress of a step that takes a while: shown once it has run for a second, then
        updated in place on a terminal (every 2 s on a pipe); short steps stay quiet."""
        now = time.perf_counter()
        if done <= 1 or self._progress is None or self._progress[0] != label:
            self._progress = [label, now, None]  # label, started, last shown
        _, started, shown = self._progress
        tty = self.out.isatty()
        due = now - started >= 1.0 and (shown is None or now - shown >= (0.1 if tty else 2.0))
        if due or (done == total and shown is not None):
            self._progress[2] = now
            line = f"       {label}: {done}/{total} ({now - started:.1f} s)"
            if tty:
                print("\r" + line, end="\n" if done == total else "", file=self.out, flush=True)
            else:
                self.say(line)

    # ------------------------------------------------------------------ sections
    def run(self, sections) -> int:
        start = time.perf_counter()
        for number, (key, title, fn) in enumerate(sections, 1):
            self.section_key = key
            self.say(f"\n[{number}/{len(sections)}] {title} ({key})")
            t0 = time.perf_counter()
            try:
                with torch.device(self.device):
                    fn(self)
            except Exception as exc:  # a crashing section is a failed check, the tour goes on
                self.checks += 1
                self.failures += 1
                self.say(f"  FAIL {key} raised {type(exc).__name__}: {exc}")
                for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                    self.say(f"       {line}")
            self.say(f"  -- {title}: {time.perf_counter() - t0:.2f} s")
        total = time.perf_counter() - start
        verdict = "all passed" if not self.failures else f"{self.failures} FAILED"
        self.say(f"\n{len(sections)} sections, {self.checks} checks, {verdict} ({total:.1f} s)")
        return 1 if self.failures else 0


def _perturb(value):
    if isinstance(value, torch.Tensor):
        return value + 1 if value.is_floating_point() else ~value if value.dtype == torch.bool \
            else value + 1
    if isinstance(value, dict):
        return {k: _perturb(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_perturb(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value + 1
    return f"{value} (perturbed)"


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape)) if t.dim() else "scalar"


def _match(got, want, exact: bool, rtol: float = CLOSE_RTOL):
    """(ok, detail) comparing two results; tensors bitwise or within ``rtol``."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return False, f"got {type(got).__name__}"
        if got.shape != want.shape or got.dtype != want.dtype:
            return False, f"{list(got.shape)} {got.dtype} vs {list(want.shape)} {want.dtype}"
        if exact or not want.is_floating_point():
            same = torch.equal(got.cpu(), want.cpu())
            return same, f"equal {_shape(want)}" if same else "values differ"
        g, w = got.detach().double().cpu(), want.detach().double().cpu()
        denom = w.norm().item()
        err = (g - w).norm().item() / (denom if denom > 0 else 1.0)
        return err <= rtol, f"rel err {err:.1e} {_shape(want)}"
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return False, "different keys"
        results = [_match(got[k], want[k], exact, rtol) for k in want]
        bad = [k for k, (ok, _) in zip(want, results) if not ok]
        return not bad, f"{len(want)} entries match" if not bad else f"differ: {bad[:3]}"
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return False, "different lengths"
        if not want:
            return True, "both empty"
        results = [_match(g, w, exact, rtol) for g, w in zip(got, want)]
        return all(ok for ok, _ in results), f"{len(want)} items match" \
            if all(ok for ok, _ in results) else "items differ"
    return got == want, f"{got!r}"[:28] if got == want else f"{got!r} vs {want!r}"[:28]


def resolve_device(choice: str) -> torch.device:
    """'auto': the first GPU if there is one, else the CPU; 'cuda' fails clearly without one."""
    if choice == "auto":
        return fastlayers.device.try_gpu()
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    return torch.device(choice)


def header(device: torch.device, quick: bool) -> List[str]:
    info = fastlayers.backend_info()
    path = info["devices"].get(device.type, {"path": "torch", "reason": "torch reference"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "host CPU"
    return [f"fastlayers {fastlayers.__version__} tour of the seed (Builders' Guide)",
            f"device {device} ({name}); fused ops run {path['path']}: {path['reason']}",
            f"torch {info['torch']}, triton {info['triton']}, backend {info['backend']}, "
            f"{'quick' if quick else 'full'} run"]


def main(device: str = "auto", quick: bool = False, out=sys.stdout) -> int:
    from .sections import SECTIONS
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # a backend that cannot run on that device (FASTLAYERS_BACKEND=triton on a CPU)
        tour = Tour(dev, quick, out, fail_section=settings.read(FAIL_ENV))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in header(dev, quick):
        tour.say(line)
    if tour.fail_section and tour.fail_section not in {k for k, _, _ in SECTIONS} | {"all"}:
        print(f"error: {FAIL_ENV}={tour.fail_section!r} names no section; sections: "
              f"{', '.join(k for k, _, _ in SECTIONS)}, all", file=sys.stderr)
        return 2
    return tour.run(SECTIONS)
