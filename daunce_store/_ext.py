"""The compiled extension ``daunce_store._kernel``, when it is built and not switched off.

Setting ``DAUNCE_STORE_NO_EXT=1`` hides it: every caller then takes its pure-Python path, which gives
the same results (the tests run both ways).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from daunce_store._constants import NO_EXT_ENV

__all__ = ["ext_disabled", "extension"]


def ext_disabled() -> bool:
    return os.environ.get(NO_EXT_ENV, "").strip().lower() not in ("", "0", "false", "no")


@functools.lru_cache(maxsize=None)
def _built() -> Any:
    try:
        from daunce_store import _kernel
    except ImportError:
        return None
    # An extension built from older sources lacks what this package calls: treat it as not built.
    return _kernel if all(hasattr(_kernel, name) for name in ("TopKAccumulator", "ChunkPlan")) else None


def extension() -> Any:
    """The extension module, or None (not built, or switched off)."""
    return None if ext_disabled() else _built()
