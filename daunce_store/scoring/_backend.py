"""Picks the scoring backend. ``auto`` = rust, then numba, then numpy; ``torch`` only when asked for.

Every backend is a streaming accumulator with the same three methods — ``push_block(offset, block)``,
``push_scores(offset, scores)`` (precomputed single-query scores, e.g. self-influence) and ``finish()``
— so callers feed the blocks of a row source (``store.rows(...).blocks()``, prefetched) one by one and memory stays
O(R·K + m·k) whatever n is. Setting ``DAUNCE_STORE_NO_EXT=1`` hides the Rust extension.

``torch`` (:mod:`daunce_store.scoring._torch`: a GPU when there is one) is never picked by ``auto``, even
with a GPU: whether it beats the CPU kernel depends on where the rows come from (a store read at a few
GB/s, then PCIe, against the Rust kernel on all cores; DESIGN §8) and that is not measured yet, and
``auto`` would have to import torch (about a second) just to look. ``available_backends()`` lists it last,
when torch imports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from daunce_store._constants import NO_EXT_ENV
from daunce_store._ext import _built, extension
from daunce_store._ext import ext_disabled as _ext_disabled
from daunce_store.errors import InvalidInputError
from daunce_store.store import ChunkSource
from daunce_store.scoring._accumulator import Accumulator
from daunce_store.scoring._numpy import NumpyTopK, check_underflow
from daunce_store.scoring._vocabulary import BACKEND_CHOICES, BACKENDS, KERNEL_MEASURES, SIDES

if TYPE_CHECKING:
    from daunce_store._kernel import ChunkPlan

__all__ = ["accumulator_class", "available_backends", "make_accumulator", "row_variance", "topk", "Accumulator", "KERNEL_MEASURES",
           "SIDES", "BACKENDS"]


def _kernel_module() -> Any:
    """The built extension even when it is switched off (only for resolving an explicit ``rust``)."""
    return _built()


def _rust() -> Any:
    return extension()


def _cpu_backends() -> list[str]:
    """The CPU kernels usable here, in ``auto`` order (cheap: never imports torch)."""
    from daunce_store.scoring import _numba

    names = []
    if _rust() is not None:
        names.append("rust")
    if _numba.available():
        names.append("numba")
    names.append("numpy")
    return names


def available_backends() -> list[str]:
    """The backends usable here, in ``auto`` order (``auto`` takes the first; ``torch``, listed when torch
    imports, comes last and only by name)."""
    from daunce_store.scoring import _torch

    return _cpu_backends() + (["torch"] if _torch.available() else [])


def resolve_backend(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise InvalidInputError(f"unknown backend {backend!r}; use {', '.join(BACKEND_CHOICES)}")
    if backend == "auto":  # the extension when built (checked first: numba's import alone takes 0.2 s)
        return "rust" if _rust() is not None else _cpu_backends()[0]
    if backend == "torch":
        from daunce_store.scoring import _torch

        _torch._torch()  # MissingDependencyError naming the extra when torch does not import
        return backend
    names = _cpu_backends()
    if backend not in names:
        why = f" ({NO_EXT_ENV} is set)" if backend == "rust" and _ext_disabled() else ""
        raise InvalidInputError(
            f"backend {backend!r} is not available here{why} (available: {', '.join(names)}); "
            "build the extension with `maturin develop --release` or pick another backend"
        )
    return backend


class _RustTopK(Accumulator):
    """Adapts the extension's accumulator: float32 C-contiguous inputs, kernel errors as ours. Its
    capabilities are declared here, beside the pyclass they describe."""

    checks_finite = True  # the kernel names a row holding NaN or inf while preparing it, at no cost
    takes_transform = True
    takes_row_scales = True
    takes_chunks = True

    def __init__(self, queries: np.ndarray, k: int, measure: str, sides: tuple[str, ...], queries_prepared: bool):
        try:
            self._acc = _kernel_module().TopKAccumulator(
                np.ascontiguousarray(queries, np.float32), int(k), measure, "pos" in sides, "neg" in sides, queries_prepared
            )
        except ValueError as e:
            raise InvalidInputError(str(e)) from None

    def push_block(self, offset: int, block: np.ndarray) -> None:
        try:
            self._acc.push_block(int(offset), np.ascontiguousarray(block, np.float32))
        except ValueError as e:
            raise InvalidInputError(str(e)) from None

    def set_transform(self, transform: np.ndarray) -> None:
        """Score every row pushed from now on as ``center(x) @ transform`` (K, K), then prepared as usual: the
        normalised preconditioned measures' rows (``Prepared.block``), computed in the kernel, so that they
        take the fused read-and-score pass too."""
        self._acc.set_transform(np.ascontiguousarray(transform, np.float32))

    def set_row_scales(self, scales: np.ndarray) -> None:
        """Multiply every score of train row i pushed from now on by ``scales[i]`` ((n,) float32): the
        normalised preconditioned measures with their persisted row scales, scored as cov rows."""
        self._acc.set_row_scales(np.ascontiguousarray(scales, np.float32).reshape(-1))

    def push_chunks(self, source: ChunkSource, plan: ChunkPlan, r0: int, r1: int) -> None:
        """Rows r0:r1 read by the kernel itself from a store's chunks (``LossStore.scan_fused``: a local
        root or an object store's client, and a ``ChunkPlan``); a damaged chunk raises the extension's
        ChunkReadError, which the store names."""
        self._acc.push_chunks(source, plan, int(r0), int(r1))

    def push_scores(self, offset: int, scores: np.ndarray) -> None:
        try:
            self._acc.push_scores(int(offset), np.ascontiguousarray(scores, np.float32).reshape(-1))
        except ValueError as e:
            raise InvalidInputError(str(e)) from None

    def finish(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        try:
            return dict(self._acc.finish())
        except ValueError as e:  # too few rows for k, or a row holding NaN or inf: the kernel's words
            raise InvalidInputError(str(e)) from None


def _check(queries: np.ndarray, k: int, measure: str, sides: tuple[str, ...]) -> np.ndarray:
    if measure not in KERNEL_MEASURES:
        raise InvalidInputError(f"kernel measure must be one of {KERNEL_MEASURES}, not {measure!r}")
    if not sides or set(sides) - set(SIDES):
        raise InvalidInputError(f"sides must be a non-empty subset of {SIDES}, not {sides!r}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be a whole number >= 1, not {k!r}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[0] < 1 or queries.shape[1] < 2:
        raise InvalidInputError(f"queries must be an (m, K) array with m >= 1 and K >= 2, not shape {queries.shape}")
    return queries


def accumulator_class(backend: str) -> type[Accumulator]:
    """The accumulator class ``backend`` (a name or ``auto``) resolves to here: what it declares it takes."""
    name = resolve_backend(backend)
    if name == "torch":
        from daunce_store.scoring._torch import TorchTopK

        return TorchTopK
    if name == "rust":
        return _RustTopK
    if name == "numba":
        from daunce_store.scoring._numba import NumbaTopK

        return NumbaTopK
    return NumpyTopK


def make_accumulator(
    queries: np.ndarray,
    k: int,
    measure: str = "cov",
    sides: tuple[str, ...] = SIDES,
    backend: str = "auto",
    queries_prepared: bool = False,
    **options: Any,
) -> Accumulator:
    """A streaming top-k accumulator of the chosen backend. ``options`` go to the torch backend only
    (``device=``, ``allow_tf32=``; see :class:`~daunce_store.scoring._torch.TorchTopK`)."""
    queries = _check(queries, k, measure, tuple(sides))
    name = resolve_backend(backend)
    if options and name != "torch":
        raise InvalidInputError(f"options {sorted(options)} are for backend='torch', not {name!r}")
    if name == "torch":
        from daunce_store.scoring._torch import TorchTopK

        return TorchTopK(queries, k, measure, tuple(sides), queries_prepared, **options)
    if name == "rust":
        return _RustTopK(queries, k, measure, tuple(sides), queries_prepared)
    if name == "numba":
        from daunce_store.scoring._numba import NumbaTopK

        return NumbaTopK(queries, k, measure, tuple(sides), queries_prepared)
    return NumpyTopK(queries, k, measure, tuple(sides), queries_prepared)


def row_variance(block: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Per-row variance over K (ddof = 1), float32: the self-influence cov(i, i)."""
    if resolve_backend(backend) == "rust":
        return _kernel_module().row_variance(np.ascontiguousarray(block, np.float32))
    return block.var(axis=1, ddof=1, dtype=np.float64).astype(np.float32)


def topk(
    blocks: Iterable[tuple[int, np.ndarray]],
    queries: np.ndarray,
    k: int,
    measure: str = "cov",
    sides: tuple[str, ...] = SIDES,
    backend: str = "auto",
    queries_prepared: bool = False,
    **options: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Streaming top-k: ``{side: (indices (m, k) int64, scores (m, k) float32)}`` over row blocks.

    Rows are centered over K (``corr``: also unit-normed; a constant row's correlation is 0);
    cov(i, j) = <a_i, b_j> / (K - 1). ``pos`` = largest first, ``neg`` = smallest first, equal scores
    go to the lower row index. Every backend returns the same indices and, to float32 tolerance, the
    same scores as the numpy reference :func:`daunce_store.scoring._numpy.topk_numpy`. ``options``:
    ``device=`` and ``allow_tf32=`` of ``backend="torch"``. A varying query whose ``cov`` scores are all 0
    or below float32's normal range (losses that vary only at ~1e-19 or less: they underflow) is a
    :class:`~daunce_store.errors.ScoreUnderflowError`, on every backend, never a ranking in row order.

    >>> import numpy as np
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3) ** 2
    >>> topk([(0, x)], x[:1], k=2, measure="corr")["pos"][0]
    array([[0, 1]])
    """
    queries = np.asarray(queries)
    if not np.isfinite(queries).all():
        raise InvalidInputError(f"queries hold NaN or inf (query row {int(np.flatnonzero(~np.isfinite(queries).all(axis=1))[0])}); scores of NaN have no order")
    acc = make_accumulator(queries, k, measure, tuple(sides), backend, queries_prepared, **options)
    for offset, block in blocks:
        push_checked(acc, offset, block)
    return check_underflow(acc.finish(), queries, queries_prepared, measure)


def push_checked(acc: Any, offset: int, block: np.ndarray) -> None:
    """``acc.push_block`` refusing a block that holds NaN or inf, naming the row: the Rust kernel notes such
    rows itself while preparing them; for the other backends the block is checked here. (A store's reads
    refuse NaN, but arrays passed in, or an inf written into a store by other means, would score as NaN.)"""
    if not getattr(acc, "checks_finite", False):
        _check_finite(offset, block)
    acc.push_block(offset, block)


def _check_finite(offset: int, block: np.ndarray) -> None:
    """InvalidInputError naming the first row of ``block`` holding NaN or inf. A float32 sum is NaN or inf
    whenever the block holds one (or, rarely, when huge finite values overflow it) and is 2× cheaper than
    isfinite, so the exact test only runs then."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = block.sum()
    if np.isfinite(total):
        return
    finite = np.isfinite(block)
    if not finite.all():
        row = offset + int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInputError(f"train losses hold NaN or inf (row {row}); scores of NaN have no order")
