"""``python -m fastlayers``: the guided tour (command line in fastlayers.tour.cli)."""
import sys

from fastlayers.tour.cli import main

if __name__ == "__main__":
    sys.exit(main())
