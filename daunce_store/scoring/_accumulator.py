"""What every streaming top-k accumulator is, and what each one declares it can take.

A scan asks the accumulator, not its type or its attributes: ``takes_transform`` (a normalised preconditioned
measure's K × K transform applied in the kernel, ``set_transform``), ``takes_row_scales`` (the persisted
per-row score factors, ``set_row_scales``), ``takes_chunks`` (it reads a store's chunks itself in
the fused read-and-score pass, ``push_chunks``: a :class:`~daunce_store.store.ChunkSink`) and ``checks_finite``
(it names a row holding NaN or inf itself, so the scan need not check blocks first).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from daunce_store.store import ChunkSource

if TYPE_CHECKING:
    from daunce_store._kernel import ChunkPlan

__all__ = ["Accumulator", "Result"]

Result = dict[str, tuple[np.ndarray, np.ndarray]]  # {side: (indices (m, k) int64, scores (m, k) float32)}


class Accumulator(abc.ABC):
    """``push_block(offset, block)`` and ``push_scores(offset, scores)`` in any order of blocks, then
    ``finish()``; the optional steps only where the class declares them."""

    checks_finite: ClassVar[bool] = False
    takes_transform: ClassVar[bool] = False
    takes_row_scales: ClassVar[bool] = False
    takes_chunks: ClassVar[bool] = False

    @abc.abstractmethod
    def push_block(self, offset: int, block: np.ndarray) -> None: ...

    @abc.abstractmethod
    def push_scores(self, offset: int, scores: np.ndarray) -> None: ...

    @abc.abstractmethod
    def finish(self) -> Result: ...

    def set_transform(self, transform: np.ndarray) -> None:
        """Score every row pushed from now on as ``center(x) @ transform`` (where ``takes_transform``)."""
        raise NotImplementedError(f"{type(self).__name__} does not take a transform")

    def set_row_scales(self, scales: np.ndarray) -> None:
        """Multiply every score of train row i pushed from now on by ``scales[i]`` (where ``takes_row_scales``)."""
        raise NotImplementedError(f"{type(self).__name__} does not take row scales")

    def push_chunks(self, source: ChunkSource, plan: ChunkPlan, r0: int, r1: int) -> None:
        """Rows r0:r1 read from a local store's chunk files by the kernel itself (where ``takes_chunks``)."""
        raise NotImplementedError(f"{type(self).__name__} does not read chunk files")
