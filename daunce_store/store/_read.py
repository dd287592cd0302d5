"""The read path: row blocks of the committed columns, from per-column chunks or packed groups.

Readers trust commit records only (a snapshot names the slots to read); packed groups are used once
their manifest exists. Chunks carry crc32c: a failed checksum or decode becomes a CorruptChunkError that
names the chunk.

Two engines read the same chunks: with the extension built, ``_kernel.read_block`` (rust/src/read.rs)
reads the chunks itself, from a local store's files or an ``s3://`` store's objects (its own client,
rust/src/chunks.rs, many GETs in flight), in parallel with the GIL released, verifies each crc32c and
assembles the block (several times zarr-python's one-thread decode; bench/RESULTS.md, "Read path" and
"S3 scan"); otherwise (other object stores, ``DAUNCE_STORE_NO_EXT=1``, arrays with other codecs, an
object store's columns of mixed chunk heights) zarr-python reads them. Both return bit-identical blocks.
When the Rust reader finds damage (a missing chunk, a failed checksum, a NaN in a committed column), the
block is read again with zarr-python, whose checks name the chunk in the words below, so an error reads
the same on both paths.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec

from daunce_store._ext import extension
from daunce_store.errors import CorruptChunkError, InvalidInputError, StorageError
from daunce_store.store._shape import StoreShape
from daunce_store.store._records import Snapshot
from daunce_store.store._rows import ChunkSource, RowSource, StoreRows

if TYPE_CHECKING:
    from daunce_store._kernel import ChunkPlan, ObjectStoreChunks

__all__ = ["ReadPathMixin", "prefetched", "scatter_columns"]


class ReadPathMixin(StoreShape):
    """The reading methods of :class:`~daunce_store.LossStore`."""

    def committed_slots(self, *, snapshot: Snapshot | None = None, query_set: str | None = None) -> list[int]:
        """The slots of the committed columns of ``snapshot`` (taken now when None), in slot order; with
        ``query_set``, those that have losses for it (UnknownQuerySetError for an unknown set)."""
        snap = snapshot or self.snapshot()
        if query_set is None:
            return list(snap.slots)
        self._query(query_set)
        return list(snap.query_slots.get(query_set, ()))

    def _resolve_slots(self, snapshot: Snapshot | None, query_set: str | None, slots: Sequence[int] | None) -> list[int]:
        """The committed slots, or ``slots`` after checking that each is one of them: a slot a killed
        writer claimed but never committed holds NaN."""
        committed = self.committed_slots(snapshot=snapshot, query_set=query_set)
        if slots is None:
            return committed
        chosen = [int(s) for s in slots]
        unknown = sorted(set(chosen) - set(committed))
        if unknown:
            where = f" with losses for query set {query_set!r}" if query_set else ""
            raise InvalidInputError(
                f"slot {unknown[0]} is not a committed column{where} in this snapshot of {self.url} (its "
                f"{len(committed)} committed slots: {committed[:8]}{' ...' if len(committed) > 8 else ''}); slots "
                "are physical column numbers (Commit.slot, Snapshot.slots), not positions 0..K-1"
            )
        return chosen

    def rows(self, snapshot: Snapshot | None = None, slots: Sequence[int] | None = None, *,
             query_set: str | None = None) -> RowSource:
        """The train rows of ``slots`` (committed slots of ``snapshot``, taken now when None, checked; by
        default all of them, or those with losses for ``query_set``): what every scan reads, in blocks or
        through a fused read-and-score pass (:class:`~daunce_store.store.RowSource`)."""
        snap = snapshot or self.snapshot()
        return StoreRows(self, snap, self._resolve_slots(snap, query_set, slots))

    def iter_row_blocks(
        self,
        *,
        snapshot: Snapshot | None = None,
        query_set: str | None = None,
        slots: Sequence[int] | None = None,
        block_rows: int | None = None,
        prefetch: int = 2,
        row_range: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_offset, block)``: train losses of rows ``[row_offset, row_offset + R)`` for the
        chosen slots, float32, C-contiguous, shape (R, K). A background thread reads ``prefetch``
        blocks ahead so reading overlaps whatever the consumer computes.

        ``slots``: committed slots of ``snapshot`` (taken now when None), checked; by default all of
        them, or those that also have losses for ``query_set``. ``row_range=(r0, r1)``: only rows
        r0 .. r1 - 1, in blocks starting at r0 (one partition of a distributed scan; r0 a multiple of
        the block rows gives the blocks of the whole scan).
        """
        chosen = self._resolve_slots(snapshot, query_set, slots)
        rows = int(block_rows or self.chunk_rows)
        first, end = _row_range(row_range, self.n_train)
        starts = list(range(first, end, rows))
        # Planned once per scan, not per block: the pack map (a listing of the manifests) and the Rust
        # reader's chunk sources. A column packed while the scan runs is read from its own chunks, which
        # hold the same values.
        read = self._block_reader(self._train_losses, chosen, pool=BlockPool(max(prefetch, 0) + 3))
        if prefetch <= 0:
            for r0 in starts:
                yield r0, read(r0, min(r0 + rows, end))
            return
        # A block of fewer chunk files than cores leaves the Rust reader's other threads idle (one file
        # per thread): then read the next blocks at the same time instead (bench/RESULTS.md, "Read path").
        workers = 1
        if read.plan is not None and self._storage.is_local:
            files = sum(-(-rows // chunk_rows) for chunk_rows in read.plan.chunk_heights)
            workers = max(1, min(prefetch, _cores() // files))
        yield from prefetched(((lambda r0=r0: (r0, read(r0, min(r0 + rows, end)))) for r0 in starts), depth=prefetch, workers=workers)

    def train_losses(self, *, snapshot: Snapshot | None = None, query_set: str | None = None, slots: Sequence[int] | None = None) -> np.ndarray:
        """The whole (n, K) train loss matrix in memory (small stores; use iter_row_blocks for big ones)."""
        chosen = self._resolve_slots(snapshot, query_set, slots)
        return self._read_rows(self._train_losses, 0, self.n_train, chosen)

    def train_rows(self, rows: np.ndarray, *, snapshot: Snapshot | None = None, slots: Sequence[int] | None = None) -> np.ndarray:
        """The K losses of the given train rows (sorted, unique), reading only the row blocks that hold them."""
        chosen = self._resolve_slots(snapshot, None, slots)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), len(chosen)), np.float32)
        step, start = self.chunk_rows, 0
        while start < len(rows):
            stop = int(np.searchsorted(rows, (rows[start] // step + 1) * step))
            r0, r1 = int(rows[start]), int(rows[stop - 1]) + 1
            out[start:stop] = self._read_rows(self._train_losses, r0, r1, chosen)[rows[start:stop] - r0]
            start = stop
        return out

    def query_losses(self, name: str, *, snapshot: Snapshot | None = None, slots: Sequence[int] | None = None) -> np.ndarray:
        """The (m, K) loss matrix of query set ``name``, columns in the same order as the train blocks."""
        arr = self._query(name)[0]
        chosen = self._resolve_slots(snapshot, name, slots)
        return self._read_rows(arr, 0, int(arr.shape[0]), chosen)

    def _read_rows(self, arr: Any, r0: int, r1: int, slots: Sequence[int], *, use_packs: bool = True, pool: BlockPool | None = None) -> np.ndarray:
        return self._block_reader(arr, slots, use_packs=use_packs, pool=pool)(r0, r1)

    def _block_reader(
        self, arr: Any, slots: Sequence[int], *, use_packs: bool = True, pool: BlockPool | None = None, threads: int | None = None,
    ) -> _BlockReader:
        """``read(r0, r1)``: rows ``r0:r1`` of ``slots`` of ``arr`` (packed groups used where
        ``use_packs``), by the Rust reader on ``threads`` threads (None: the kernel's lanes) where it
        applies, else zarr-python. What the rows do not change (pack map, sources) is worked out here once."""
        packs = self._pack_map() if use_packs and arr is self._train_losses else {}
        slots = list(slots)
        plan = self._chunk_plan(arr, slots, packs)
        source = self._chunk_source()
        if plan is None or source is None or not (self._storage.is_local or len(set(plan.chunk_heights)) <= 1):
            return _BlockReader(lambda r0, r1: self._zarr_read_rows(arr, r0, r1, slots, packs), None)
        ext = extension()

        def read(r0: int, r1: int) -> np.ndarray:
            # numpy's buffer, not one Rust allocates: numpy backs large arrays with huge pages, and the
            # page faults of a fresh 64 MB allocation cost more than reading the chunks (bench/RESULTS.md,
            # "Read path"); a scan recycles the buffers its consumer has let go of.
            shape = (r1 - r0, len(slots))
            out = pool.take(shape) if pool is not None else np.empty(shape, dtype=np.float32)
            try:
                ext.read_block(source, plan, r0, r1, out, threads)
                return out
            except ext.ChunkReadError as e:
                self._name_damage(e, arr, r0, r1, slots, packs)

        return _BlockReader(read, plan)

    def _name_damage(self, err: Exception, arr: Any, r0: int, r1: int, slots: Sequence[int], packs: dict[int, tuple[int, int]]) -> NoReturn:
        """Raise CorruptChunkError for the Rust reader's ``ChunkReadError`` over rows ``r0:r1`` (StorageError
        where the object store did not answer)."""
        kind, key, message = err.args
        if kind == "fetch":  # the client's retries are spent; the chunk may well be fine
            raise StorageError(
                f"{message.replace(repr(key), f'{key!r} of {self.url}', 1)}; check that the store is reachable "
                "(endpoint, credentials, network) and run the command again"
            ) from err
        # zarr-python's checks name the damage in the words every path uses (a race with a writer
        # cannot make it read cleanly: committed chunks are never rewritten).
        self._zarr_read_rows(arr, r0, r1, slots, packs)
        raise CorruptChunkError(
            f"{message.replace(repr(key), f'{key!r} of {self.url}', 1)}; restore the chunk from a complete copy "
            "of the store, or re-run that perturbation into a new store; `daunce verify` lists every damaged chunk"
        ) from err

    def scan_fused(
        self, push: Callable[[ChunkSource, ChunkPlan, int, int], None], *,
        snapshot: Snapshot | None = None, slots: Sequence[int] | None = None, row_range: tuple[int, int] | None = None,
    ) -> bool:
        """Feed every train row of ``slots`` to ``push(source, plan, r0, r1)``, an accumulator's fused
        read-and-score pass (``_kernel.TopKAccumulator.push_chunks``: it reads the chunks itself, from a
        local store's files or an ``s3://`` store's objects fetched ahead, and scores each 1 MB segment
        while it is in cache, so no block is written to memory and read back), and return True; return
        False, having pushed nothing, where that pass does not apply: where the Rust reader does not
        (object stores other than S3, ``DAUNCE_STORE_NO_EXT=1``), where the columns' chunks differ in
        height (young columns beside packed groups), or with ``DAUNCE_STORE_FUSED=0`` (for A/B timing).
        ``row_range=(r0, r1)``: only those rows (one partition of a distributed scan; partitions that start
        on chunk boundaries score every row as the whole scan does, to the bit). Damage raises
        CorruptChunkError in the words of every other path."""
        if os.environ.get("DAUNCE_STORE_FUSED", "1") == "0":
            return False
        chosen = self._resolve_slots(snapshot, None, slots)
        first, end = _row_range(row_range, self.n_train)
        packs = self._pack_map()
        plan = self._chunk_plan(self._train_losses, chosen, packs)
        source = self._chunk_source()
        if plan is None or source is None or len(set(plan.chunk_heights)) != 1:
            return False
        unit = plan.chunk_heights[0]
        # A few chunks per thread per call: the GIL comes back for Ctrl-C every few ms. An object store's
        # calls are longer (its prefetch restarts with each), about 1 GB of chunks.
        step = unit * 4 * _cores() if self._storage.is_local else unit * max(4 * _cores(), (1 << 28) // (unit * plan.ncols))
        ext = extension()
        for r0 in range(first, end, step):
            r1 = min(r0 + step, end)
            try:
                push(source, plan, r0, r1)
            except ext.ChunkReadError as e:
                self._name_damage(e, self._train_losses, r0, r1, chosen, packs)
        return True

    def _chunk_source(self) -> ChunkSource | None:
        """Where the Rust reader reads this store's chunks: the local root, or its own client of an
        ``s3://`` store (made once per store, with the options it was opened with); None where it does not
        read (extension not built or switched off, another kind of object store)."""
        ext = extension()
        if ext is None:
            return None
        storage = self._storage
        if storage.is_local:
            return str(storage.path)
        if storage.chunk_client is None:
            options = storage.rust_client_options()
            if options is None:
                return None
            try:
                storage.chunk_client = ext.ObjectStoreChunks(storage.url, options)
            except ValueError:  # an option the Rust client does not know: obstore's path reads
                storage.chunk_client = False
        return storage.chunk_client or None

    def _chunk_plan(self, arr: Any, slots: Sequence[int], packs: dict[int, tuple[int, int]]) -> ChunkPlan | None:
        """The chunks ``_kernel.read_block`` assembles ``slots`` from, or None where the Rust reader does
        not apply (extension not built or switched off, an array whose chunks are not plain float32 +
        crc32c)."""
        ext = extension()
        if ext is None or not _plain_chunks(arr):
            return None
        plan = ext.ChunkPlan()

        def add(a: Any, column: int, j: int) -> None:
            plan.add_column(a.path, int(a.chunks[0]), int(a.chunks[1]), column, j)

        if any(s in packs for s in slots):
            packed = self._packed_array()
            if not _plain_chunks(packed):
                return None
            for j, slot in enumerate(slots):
                if slot in packs:
                    group, pos = packs[slot]
                    add(packed, group * self.pack_width + pos, j)
                else:
                    add(arr, slot, j)
        else:
            for j, slot in enumerate(slots):
                add(arr, slot, j)
        return plan

    def _scan_unit_rows(self, slots: Sequence[int]) -> int:
        """The smallest block height that reads every chunk of a scan of ``slots`` once: the row chunk
        of the packed groups, or of the per-column chunks when a young column is among them."""
        packs = self._pack_map()
        unit = int(self._packed_array().chunks[0]) if any(s in packs for s in slots) else self.chunk_rows
        if any(s not in packs for s in slots):
            unit = int(np.lcm(unit, self.chunk_rows))
        return min(unit, max(self.n_train, 1))

    def _zarr_read_rows(self, arr: Any, r0: int, r1: int, slots: Sequence[int], packs: dict[int, tuple[int, int]]) -> np.ndarray:
        if not any(s in packs for s in slots):
            return self._read_columns(arr, r0, r1, slots)
        # Packed columns come from wide chunks (one read per group), the young rest per column.
        out = np.empty((r1 - r0, len(slots)), dtype=np.float32)
        groups: dict[int, list[tuple[int, int]]] = {}
        young: list[tuple[int, int]] = []
        for j, slot in enumerate(slots):
            if slot in packs:
                group, pos = packs[slot]
                groups.setdefault(group, []).append((j, pos))
            else:
                young.append((j, slot))
        packed = self._packed_array()
        width = self.pack_width
        for group, pairs in groups.items():
            lo, hi = min(p for _, p in pairs), max(p for _, p in pairs) + 1
            try:
                block = packed[r0:r1, group * width + lo : group * width + hi]
            except (ValueError, RuntimeError) as e:
                raise CorruptChunkError(self._locate_corruption(packed, r0, r1, [group * width + p for _, p in pairs], e)) from e
            self._check_complete(packed, r0, block, [group * width + p for p in range(lo, hi)], columns_last=True)
            if len(groups) == 1 and not young and [p - lo for _, p in pairs] == list(range(block.shape[1])):
                return np.ascontiguousarray(block)  # the common case: one whole group, in order
            scatter_columns(out, [(j, p - lo) for j, p in pairs], block)
        if young:
            scatter_columns(out, [(j, i) for i, (j, _) in enumerate(young)], self._read_columns(arr, r0, r1, [s for _, s in young]))
        return out

    def _read_columns(self, arr: Any, r0: int, r1: int, slots: Sequence[int]) -> np.ndarray:
        # One 1-d read per column (each is one contiguous chunk run) into a (K, R) buffer, then a
        # transpose: measured several times faster than zarr's strided 2-d selection on 1-wide chunks.
        buf = np.empty((len(slots), r1 - r0), dtype=np.float32)
        try:
            for j, slot in enumerate(slots):
                buf[j] = arr[r0:r1, slot]
        except (ValueError, RuntimeError) as e:  # crc32c mismatch or undecodable chunk (zarrs: RuntimeError)
            raise CorruptChunkError(self._locate_corruption(arr, r0, r1, slots, e)) from e
        self._check_complete(arr, r0, buf, slots, columns_last=False)
        return np.ascontiguousarray(buf.T)

    def _check_complete(self, arr: Any, r0: int, block: np.ndarray, columns: Sequence[int], *, columns_last: bool) -> None:
        """Committed losses are finite (append refuses anything else), so a NaN read from a committed
        column is a chunk that is absent (a partial copy, an rsync, an object-store lifecycle rule):
        Zarr fills it with the NaN fill value. Say so by name instead of scoring NaN."""
        if not np.isnan(block.sum()):  # one pass, no temporary (half the cost of isnan().any()): the common case
            return
        nan_rows = np.isnan(block).any(axis=0 if columns_last else 1)
        if not nan_rows.any():  # the sum overflowed to inf - inf; no NaN after all
            return
        j = int(np.flatnonzero(nan_rows)[0])
        column = np.asarray(block[:, j] if columns_last else block[j])
        row = r0 + int(np.flatnonzero(np.isnan(column))[0])
        rows, width = int(arr.chunks[0]), int(arr.chunks[1])
        key = f"{arr.path}/c/{row // rows}/{columns[j] // width}"
        present = self._storage.get_bytes(key) is not None
        what = "holds NaN where a committed column has finite losses" if present else "is missing"
        raise CorruptChunkError(
            f"chunk {key!r} of {self.url} {what} (column {columns[j]} of {arr.path}, from row {row}); "
            f"{int(nan_rows.sum())} column(s) of rows {r0}:{r0 + block.shape[0 if columns_last else 1]} are affected. "
            "Restore the chunk from a complete copy of the store, or re-run that perturbation into a new store; "
            "`daunce verify` lists every damaged chunk"
        )

    def _locate_corruption(self, arr: Any, r0: int, r1: int, slots: Sequence[int], err: Exception) -> str:
        rows, width = int(arr.chunks[0]), int(arr.chunks[1])
        for slot in slots:
            for c0 in range(r0 - r0 % rows, r1, rows):
                try:
                    arr[c0 : min(c0 + rows, arr.shape[0]), slot]
                except (ValueError, RuntimeError) as e:
                    key = f"{arr.path}/c/{c0 // rows}/{slot // width}"
                    return (
                        f"chunk {key!r} of {self.url} is corrupt ({e}); the column in slot {slot} cannot be "
                        "read. Restore the chunk from a copy, or re-run that perturbation into a new store"
                    )
        return f"could not read rows {r0}:{r1} of {arr.path} in {self.url}: {err}"


def _row_range(row_range: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """``row_range`` checked against n rows (None: all of them)."""
    if row_range is None:
        return 0, n
    try:
        r0, r1 = (int(r) for r in row_range)
    except (TypeError, ValueError):
        raise InvalidInputError(f"row_range must be a pair (r0, r1) of row numbers, not {row_range!r}") from None
    if not 0 <= r0 <= r1 <= n:
        raise InvalidInputError(f"row_range {row_range!r} is outside the store's rows 0..{n}; need 0 <= r0 <= r1 <= {n}")
    return r0, r1


class _BlockReader:
    """``read(r0, r1)`` of :meth:`ReadPathMixin._block_reader`; ``plan``: the Rust reader's chunk plan,
    None where zarr-python reads."""

    __slots__ = ("plan", "read")

    def __init__(self, read: Callable[[int, int], np.ndarray], plan: ChunkPlan | None):
        self.read = read
        self.plan = plan

    def __call__(self, r0: int, r1: int) -> np.ndarray:
        return self.read(r0, r1)


def _cores() -> int:
    """The cores this process may run on (what the Rust reader's default thread count follows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class BlockPool:
    """The block buffers of one scan, recycled: a fresh 64 MB array costs ~7 ms of page faults per block,
    a third of what the Rust reader needs to fill it. A buffer is handed out again only when nothing but
    this pool refers to it (its reference count), so a block the consumer keeps, or any view of it, is
    never overwritten; the pool holds the latest few buffers, so one that keeps every block gets fresh ones."""

    def __init__(self, size: int):
        self._size = size
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, int]) -> np.ndarray:
        with self._lock:
            for i in range(len(self._buffers)):
                # 2 references: the list's and getrefcount's argument. The count can only grow through a
                # reference someone already holds, so a free buffer stays free.
                if self._buffers[i].shape == shape and sys.getrefcount(self._buffers[i]) == 2:
                    return self._buffers[i]
            buf = np.empty(shape, dtype=np.float32)
            self._buffers.append(buf)
            if len(self._buffers) > self._size:  # forget the oldest (kept by its consumer, most likely)
                self._buffers.pop(0)
            return buf


def _plain_chunks(arr: Any) -> bool:
    """Whether ``arr``'s chunks are what the Rust reader decodes: a regular grid of float32 chunks,
    codecs exactly ``bytes`` (little endian) + ``crc32c``, default chunk keys ``c/<i>/<j>``, 2-d."""
    meta = getattr(arr, "metadata", None)
    if meta is None or getattr(meta, "zarr_format", None) != 3 or len(getattr(arr, "shape", ())) != 2:
        return False
    codecs = tuple(meta.codecs)
    encoding = meta.chunk_key_encoding
    return (
        np.dtype(arr.dtype) == np.dtype("<f4")
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and codecs[0].endian is not None
        and codecs[0].endian.value == "little"
        and isinstance(codecs[1], Crc32cCodec)
        and type(encoding).__name__ == "DefaultChunkKeyEncoding"
        and getattr(encoding, "separator", None) == "/"
        and type(meta.chunk_grid).__name__ == "RegularChunkGrid"
        and not meta.storage_transformers
    )


def scatter_columns(out: np.ndarray, pairs: list[tuple[int, int]], src: np.ndarray) -> None:
    """``out[:, j] = src[:, i]`` for each (j, i), copying runs of consecutive columns as slices
    (numpy's fancy column indexing is ~40x slower than a slice copy on (2^18, 64) blocks)."""
    pairs = sorted(pairs)
    start = 0
    for end in range(1, len(pairs) + 1):
        if end == len(pairs) or pairs[end] != (pairs[end - 1][0] + 1, pairs[end - 1][1] + 1):
            j0, i0 = pairs[start]
            length = end - start
            out[:, j0 : j0 + length] = src[:, i0 : i0 + length]
            start = end


def prefetched(thunks: Iterator[Any], depth: int, workers: int = 1) -> Iterator[Any]:
    """Run ``thunks`` in a background thread, ``depth`` results ahead of the consumer; with ``workers``
    > 1, up to ``depth`` of them at once on that many threads, results still in order."""
    if workers > 1:
        yield from _prefetched_parallel(thunks, depth, workers)
        return
    results: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    _DONE = object()

    def produce() -> None:
        try:
            for thunk in thunks:
                if stop.is_set():
                    return
                results.put((True, thunk()))
        except BaseException as e:  # hand the error to the consumer
            results.put((False, e))
            return
        results.put((True, _DONE))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(produce)
        try:
            while True:
                ok, item = results.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            stop.set()
            while not results.empty():  # unblock a producer waiting on a full queue
                results.get_nowait()


def _prefetched_parallel(thunks: Iterator[Any], depth: int, workers: int) -> Iterator[Any]:
    pending: collections.deque[Future[Any]] = collections.deque()
    thunks = iter(thunks)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for thunk in itertools.islice(thunks, max(depth, 1)):
                pending.append(pool.submit(thunk))
            while pending:
                item = pending.popleft().result()
                nxt = next(thunks, None)
                if nxt is not None:
                    pending.append(pool.submit(nxt))
                yield item
        finally:
            for f in pending:
                f.cancel()
