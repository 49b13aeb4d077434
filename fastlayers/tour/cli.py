"""``python -m fastlayers [--device auto|cpu|cuda] [--quick]``: the tour's command line."""
import argparse


def main(argv=None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the tour; returns the exit status
    (0 all checks passed, 1 a check failed, 2 bad arguments; argparse exits 2 itself)."""
    parser = argparse.ArgumentParser(
        prog="python -m fastlayers",
        description="A guided tour of the seed (Builders' Guide) run through fastlayers: every "
                    "step checked against the seed's plain-torch code. Exit status: "
                    "0 all checks passed, 1 a check failed, 2 bad arguments.")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (auto: the first GPU if there is one, else the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the seed's small sizes only, a few seconds on a CPU")
    args = parser.parse_args(argv)
    from .runner import main as tour
    return tour(args.device, args.quick)
