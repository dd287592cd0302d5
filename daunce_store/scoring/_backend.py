"""Picks the scoring backend. ``auto`` = rust, then numba, then numpy."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring._numpy import topk_numpy

__all__ = ["available_backends", "topk", "MEASURES", "SIDES"]

MEASURES = ("cov", "corr")
SIDES = ("pos", "neg")


def available_backends() -> list[str]:
    return ["numpy"]


def _resolve(backend: str) -> str:
    names = available_backends()
    if backend == "auto":
        return names[0]
    if backend not in ("rust", "numba", "numpy"):
        raise InvalidInputError(f"unknown backend {backend!r}; use auto, rust, numba or numpy")
    if backend not in names:
        raise InvalidInputError(f"backend {backend!r} is not available here (available: {', '.join(names)})")
    return backend


def topk(
    blocks: Iterable[tuple[int, np.ndarray]],
    queries: np.ndarray,
    k: int,
    measure: str = "cov",
    sides: tuple[str, ...] = SIDES,
    backend: str = "auto",
    queries_prepared: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Streaming top-k: ``{side: (indices (m, k), scores (m, k))}`` over row blocks of train losses.

    See :func:`daunce_store.scoring._numpy.topk_numpy` for the contract every backend meets.
    """
    if measure not in MEASURES:
        raise InvalidInputError(f"measure must be one of {MEASURES}, not {measure!r}")
    if not sides or set(sides) - set(SIDES):
        raise InvalidInputError(f"sides must be a non-empty subset of {SIDES}, not {sides!r}")
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, not {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    name = _resolve(backend)
    return topk_numpy(blocks, queries, k, measure, tuple(sides), queries_prepared)
