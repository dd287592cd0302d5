"""Optional dependencies: the scoring install has none of torch, scikit-learn or matplotlib; the parts
that use them import them through :func:`import_optional`, which names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from daunce_store.errors import MissingDependencyError

__all__ = ["import_optional"]


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or MissingDependencyError saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]} ({e}); install it with: pip install 'daunce-store[{extra}]'"
        ) from None
