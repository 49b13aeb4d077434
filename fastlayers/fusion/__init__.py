"""Graph rewriting behind the ``fastlayers`` torch.compile backend.

* :mod:`.patterns`: find Linear+ReLU, x - mean(x) and relu(x @ W + c) in a Dynamo FX graph,
  with the conditions under which replacing them is invisible to the user.
* :mod:`.rewrite`: replace the matches with calls of ``fastlayers.functional``.
* :mod:`.report`: what was fused (and what was left alone, and why), per pattern and line.

The backend itself (options, Inductor hand-off, ``explain``) is ``fastlayers.compile_backend``.
"""
from .patterns import PATTERNS, Match, find_matches  # noqa: F401
from .report import Fusion, FusionReport, Skip  # noqa: F401
from .rewrite import apply_matches  # noqa: F401
