"""Row sources: the train rows of one snapshot's chosen columns, as every scan reads them.

``store.rows(snapshot, slots)`` returns a :class:`RowSource`, the one seam between where rows live and what
scores them (DESIGN §8). Scoring, the Gram pass, a Dask task and a server's requests all read through it:

* :class:`StoreRows`: the store's own chunks, as ``iter_row_blocks`` reads them (local chunk files through
  the Rust reader, object stores and the reference path through zarr-python), and the fused read-and-score
  pass where the store offers one (``LossStore.scan_fused``);
* :class:`MemoryRows`: rows already in memory (``daunce serve`` keeps a snapshot's rows cached), cut into
  the same blocks, so sums over blocks add in the same order and give the same bits.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from daunce_store._kernel import ChunkPlan, ObjectStoreChunks
    from daunce_store.store._records import Snapshot

__all__ = ["ChunkSink", "ChunkSource", "MemoryRows", "RowSource", "StoreRows"]

#: Where the Rust reader reads chunks (``_kernel.read_block``, ``TopKAccumulator.push_chunks``, each with a
#: ``_kernel.ChunkPlan`` of the chunks a scan assembles): a local store's root, or an ``s3://`` store's client.
ChunkSource: TypeAlias = "str | ObjectStoreChunks"


class ChunkSink(Protocol):
    """What takes a store's fused read-and-score pass: an accumulator that reads chunk files itself
    (``_kernel.TopKAccumulator.push_chunks``)."""

    def push_chunks(self, source: ChunkSource, plan: ChunkPlan, r0: int, r1: int) -> None: ...


class _ChunkStore(Protocol):
    """What :class:`StoreRows` reads through (``LossStore``'s read path; typed by shape: the read path makes
    row sources, so this module cannot import it)."""

    @property
    def n_train(self) -> int: ...
    @property
    def chunk_rows(self) -> int: ...
    def _scan_unit_rows(self, slots: Sequence[int]) -> int: ...
    def iter_row_blocks(self, *, snapshot: Snapshot | None = None, query_set: str | None = None,
                        slots: Sequence[int] | None = None, block_rows: int | None = None, prefetch: int = 2,
                        row_range: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]: ...
    def scan_fused(self, push: Callable[[ChunkSource, ChunkPlan, int, int], None], *, snapshot: Snapshot | None = None,
                   slots: Sequence[int] | None = None, row_range: tuple[int, int] | None = None) -> bool: ...


class RowSource(abc.ABC):
    """The train rows (``n_rows`` × ``len(slots)``, float32) of one snapshot's columns ``slots``.

    ``unit_rows``: the block height that reads each stored chunk once (blocks that are whole multiples of it,
    starting on multiples of it, never read a chunk twice); ``chunk_rows``: the default block height."""

    snapshot: Snapshot
    slots: tuple[int, ...]
    n_rows: int
    unit_rows: int
    chunk_rows: int

    @abc.abstractmethod
    def blocks(self, block_rows: int | None = None, row_range: tuple[int, int] | None = None,
               prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        """``(row_offset, block)`` over rows ``row_range`` (default all), ``block_rows`` high (default
        ``chunk_rows``), the first block starting at the range's start; each block C-contiguous (R, K)."""

    def push_into(self, sink: ChunkSink, row_range: tuple[int, int] | None = None) -> bool:
        """Feed rows ``row_range`` to ``sink``'s fused pass and return True, or push nothing and return False
        where this source has none (then read :meth:`blocks`)."""
        return False


class StoreRows(RowSource):
    """Rows read from the store's chunks."""

    def __init__(self, store: _ChunkStore, snapshot: Snapshot, slots: Sequence[int]):
        self.store, self.snapshot, self.slots = store, snapshot, tuple(int(s) for s in slots)
        self.n_rows = int(store.n_train)
        self.chunk_rows = int(store.chunk_rows)
        self.unit_rows = store._scan_unit_rows(self.slots)

    def blocks(self, block_rows: int | None = None, row_range: tuple[int, int] | None = None,
               prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        return self.store.iter_row_blocks(snapshot=self.snapshot, slots=list(self.slots), block_rows=block_rows,
                                          prefetch=prefetch, row_range=row_range)

    def push_into(self, sink: ChunkSink, row_range: tuple[int, int] | None = None) -> bool:
        return self.store.scan_fused(sink.push_chunks, snapshot=self.snapshot, slots=self.slots, row_range=row_range)


class MemoryRows(RowSource):
    """Rows held in memory: ``losses`` (n, K') over ``held`` slots, of which ``slots`` are read (a subset or
    reordering). Blocks are cut as :class:`StoreRows` cuts them (``chunk_rows``, ``unit_rows``: the store's)."""

    def __init__(self, losses: np.ndarray, held: Sequence[int], snapshot: Snapshot, slots: Sequence[int], chunk_rows: int,
                 unit_rows: int):
        where = {int(s): i for i, s in enumerate(held)}
        self.snapshot, self.slots = snapshot, tuple(int(s) for s in slots)
        self.losses = losses
        cols = np.array([where[s] for s in self.slots], dtype=np.int64)
        self._cols: Any = None if np.array_equal(cols, np.arange(len(held))) else cols
        self.n_rows = int(losses.shape[0])
        self.chunk_rows, self.unit_rows = int(chunk_rows), int(unit_rows)

    def blocks(self, block_rows: int | None = None, row_range: tuple[int, int] | None = None,
               prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        first, end = (0, self.n_rows) if row_range is None else (int(row_range[0]), int(row_range[1]))
        step = int(block_rows or self.chunk_rows)
        for offset in range(first, end, step):
            block = self.losses[offset : min(offset + step, end)]  # a row range of a C-contiguous array: no copy
            yield offset, block if self._cols is None else np.ascontiguousarray(block[:, self._cols])
