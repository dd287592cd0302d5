"""The served store: a read-only :class:`~daunce_store.Store` whose committed train rows sit in memory.

A server answers many scoring requests against one store; :class:`ServedStore` reads the committed columns
once per snapshot and hands them to every scan as its row source: every scan reads ``store.rows(snapshot,
slots)``, which here is a :class:`~daunce_store.store.MemoryRows` over the cached rows (cut into the blocks the
store's own block path yields, so sums over blocks give the same bits), so the façade's own ``topk``,
``influence``, ``self_influence`` and ``stability`` run unchanged on memory. Columns that land later are picked up by
:meth:`ServedStore.current`, which each request calls: one listing of the commit records, and a reload
only when it found new ones (incremental attribution without a restart).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from daunce_store._api import Store
from daunce_store.errors import InvalidInputError
from daunce_store.store import MemoryRows, RowSource, Snapshot

__all__ = ["DEFAULT_CACHE_BYTES", "ServedStore"]

# Train rows kept in memory up to this size (n × K × 4 bytes); a bigger store is scanned from storage
# per request, as `daunce topk` does. 1M rows × 256 columns is 1 GiB.
DEFAULT_CACHE_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The committed train rows of one snapshot: ``losses`` (n, K) float32 over ``slots``, or None when
    they exceed the cache size (then scans read the store)."""

    slots: tuple[int, ...]
    losses: np.ndarray | None
    nbytes: int
    load_seconds: float


class ServedStore(Store):
    """A read-only store handle for a server: :meth:`current` takes the snapshot of each request and keeps
    its committed train rows in memory; scans of those columns (or a subset of them) read memory.

    >>> store = ServedStore.open_served("attrib.zarr")        # doctest: +SKIP
    >>> snap = store.current(); store.topk("test", k=5, snapshot=snap)  # doctest: +SKIP
    """

    _rows: _Rows | None = None
    _lock: threading.Lock
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def open_served(cls, url: str, *, storage_options: dict[str, Any] | None = None,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> ServedStore:
        """Open ``url`` read-only and load its committed train rows (when within ``cache_bytes``)."""
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise InvalidInputError(f"cache_bytes must be a whole number >= 0 (0: always read the store), not {cache_bytes!r}")
        store = cls.open(url, "r", storage_options)
        store._lock = threading.Lock()
        store.cache_bytes = cache_bytes
        store.train_ids  # all ids in memory: naming a top-k then reads nothing (train_ids_at uses them)
        store.current()
        return store

    def current(self) -> Snapshot:
        """The committed columns now; their train rows are (re)loaded when new columns were committed since
        the last call. Serialized: the commit-record cache and the row cache are shared by all requests."""
        with self._lock:
            snap = self.snapshot()  # one listing; only new commit records are fetched
            if self._rows is None or self._rows.slots != snap.slots:
                self._rows = self._load(snap)
            return snap

    @property
    def rows_info(self) -> dict[str, Any]:
        """What sits in memory: columns, bytes, whether rows are cached, and how long they took to load."""
        rows = self._rows
        if rows is None:
            return {"cached": False, "columns": 0, "bytes": 0, "load_seconds": 0.0}
        return {"cached": rows.losses is not None, "columns": len(rows.slots), "bytes": rows.nbytes,
                "load_seconds": round(rows.load_seconds, 3), "cache_limit_bytes": self.cache_bytes}

    def _load(self, snap: Snapshot) -> _Rows:
        nbytes = self.n_train * len(snap.slots) * 4
        if not snap.slots or nbytes > self.cache_bytes:
            return _Rows(snap.slots, None, 0, 0.0)
        start = time.perf_counter()
        source = super().rows(snap, snap.slots)
        losses = np.empty((self.n_train, len(snap.slots)), np.float32)
        for offset, block in source.blocks(source.unit_rows):
            losses[offset : offset + len(block)] = block
        losses.flags.writeable = False  # shared by every request: a consumer that writes into it fails, not corrupts
        return _Rows(snap.slots, losses, nbytes, time.perf_counter() - start)

    def rows(self, snapshot: Snapshot | None = None, slots: Sequence[int] | None = None, *,
             query_set: str | None = None) -> RowSource:
        """The rows in memory when they hold the chosen columns (the cached snapshot's, or some of them: a
        committed column never changes), else the store's."""
        rows = self._rows  # one reference for the whole scan: a reload meanwhile swaps in a new object
        snap = snapshot or self.snapshot()
        chosen = self._resolve_slots(snap, query_set, slots)
        if rows is None or rows.losses is None or not set(chosen) <= set(rows.slots):
            return super().rows(snap, chosen)
        return MemoryRows(rows.losses, rows.slots, snap, chosen, self.chunk_rows, self._scan_unit_rows(rows.slots))
