"""The launcher recipes reuse the perturbation tests' digits factory and CLI helpers."""

from __future__ import annotations

import sys
from pathlib import Path

PERTURB_TESTS = Path(__file__).resolve().parents[1] / "perturb"
if str(PERTURB_TESTS) not in sys.path:
    sys.path.insert(0, str(PERTURB_TESTS))
