"""The ``backend`` fixture: every kernel test runs once per backend (helpers: ``_topk_support.py``)."""

from __future__ import annotations

import pytest

from daunce_store._constants import NO_EXT_ENV
from daunce_store.scoring._backend import BACKENDS, _ext_disabled, available_backends


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    if name not in available_backends():
        if name == "rust" and not _ext_disabled():
            pytest.fail(f"the Rust extension is not built; run `maturin develop --release` (or set {NO_EXT_ENV}=1)")
        pytest.skip(f"backend {name} is not available here")
    return name
