"""``python -m fastlayers``: a guided tour of the seed's Builders' Guide, run through fastlayers.

    runner.py    Tour (runs sections, records checks, prints) and main(device, quick, out)
    sections.py  one function per part of the seed, in the seed's order (SECTIONS)
    seed.py      the seed's own plain-torch code, the oracle the tour, tests and benchmarks
                 compare against (``from fastlayers.tour import seed``)
    cli.py       the command line (``fastlayers/__main__.py`` calls it)
"""
from .runner import CLOSE_RTOL, FAIL_ENV, Tour, header, main, resolve_device

__all__ = ["CLOSE_RTOL", "FAIL_ENV", "Tour", "header", "main", "resolve_device"]
