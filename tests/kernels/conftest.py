"""Backends under test and the comparison helpers every kernel test uses."""

from __future__ import annotations

import os

import numpy as np
import pytest

from daunce_store._constants import NO_EXT_ENV
from daunce_store.scoring._backend import BACKENDS, available_backends


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    if name not in available_backends():
        if name == "rust" and not os.environ.get(NO_EXT_ENV):
            pytest.fail("the Rust extension is not built; run `maturin develop --release`")
        pytest.skip(f"backend {name} is not available here")
    return name
