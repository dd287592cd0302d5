"""Scoring on a Dask cluster: the Dask executor of :mod:`._executor`, with the same answer, exactly.

The driver (the caller's process) fixes the snapshot, validates the request and prepares the queries once, as
every scoring operation does (:func:`~daunce_store.scoring.topk_store` with ``client=``); the train rows are
split into partitions that are whole multiples of the scan's block rows (and of the store's chunk rows), and
one task per partition opens the store by URL, read-only, and runs the operation's partition function on its
rows of ``store.rows(snapshot, slots)``: columns committed after the driver's snapshot never enter. Each task
returns its per-query top-k (global row indices, scores) per side, O(m·k); partial results merge pairwise in a
tree on the workers.

Why the answer is the single-process one, exactly (DESIGN §8):

* every block a task reads is a block of the single-process scan (partitions start at multiples of the
  block rows), prepared by the same ``Prepared.block`` and scored by the same kernel, so each row's score
  has the same bits (the worker's ``auto`` backend: the same one where driver and workers run the same
  build);
* the kernels' order — score (descending for ``pos``, ascending for ``neg``), then lower row index — is a
  total order on (score, row), so the top-k of a union is the top-k of the union of the parts' top-k, in
  any grouping: :func:`merge_partials` is associative and commutative;
* the Gram matrix of the ``nystrom`` and ``whitened`` measures (one pass over the rows) is summed as a
  distributed pass too, but the tasks return one (K, K) part per block and the driver adds them in row
  order, as :func:`~daunce_store.scoring._measures.gram_pass` does, so the preconditioner has the same bits
  as well. It is persisted in the store (``stored_gram``); a matrix another process persisted for the same
  columns is used without a pass.

Dask is an optional dependency (the ``dask`` extra), imported only here and only when a cluster is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from daunce_store._optional import import_optional
from daunce_store.errors import DaunceStoreError, InvalidInputError
from daunce_store.scoring._accumulator import Result
from daunce_store.scoring._executor import Executor, LocalExecutor, PartitionFn, TaskT, scan_block_rows
from daunce_store.scoring._measures import Gram, gram_parts
from daunce_store.store import LossStore, RowSource, Snapshot

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["CONNECT_TIMEOUT_S", "DEFAULT_PARTITION_ROWS", "DaskExecutor", "connect", "executor", "merge_partials", "partition_bounds"]

# About 4M rows per task: at K = 64 a partition is 1 GB of losses, long enough (a second or more of
# reading and scoring) that a task's fixed cost — opening the store, shipping m·k results — stays small,
# and 10M rows still make 3 tasks to spread. Rounded up to whole blocks.
DEFAULT_PARTITION_ROWS = 1 << 22
# Seconds to wait for a scheduler given by address: a wrong or dead address fails, it does not hang.
CONNECT_TIMEOUT_S = 10.0

Partial = Result  # {side: (indices (m, k') int64, scores (m, k') float32)} of some rows


def _distributed() -> Any:
    return import_optional("distributed", "dask", "scoring on a Dask cluster")


# --- the cluster ----------------------------------------------------------------------------------------
def connect(address: str, timeout: float | None = None) -> Client:
    """A ``distributed.Client`` for the scheduler at ``address`` (``tcp://HOST:PORT``), or a
    DaunceStoreError within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`) when there is none."""
    distributed = _distributed()
    if not isinstance(address, str) or not address.strip():
        raise InvalidInputError(f"a Dask scheduler address is a string such as 'tcp://10.0.0.5:8786', not {address!r}")
    # The address is parsed here, before a Client exists: a Client that fails on a malformed address leaves
    # its event-loop thread in a state that made the next Client in the process fail to start.
    try:
        scheme, location = distributed.comm.addressing.parse_address(address.strip())
        distributed.comm.registry.get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            distributed.comm.addressing.parse_host_port(location)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(
            f"{address!r} is not a Dask scheduler address ({e}); give one such as 'tcp://10.0.0.5:8786'"
        ) from None
    wait = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        return distributed.Client(address.strip(), timeout=wait, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise DaunceStoreError(
            f"no Dask scheduler answered at {address!r} within {wait:g} s ({type(e).__name__}: {e}); start one "
            "(`dask scheduler` prints its tcp://HOST:PORT, then `dask worker tcp://HOST:PORT` on each machine) "
            "or check the address"
        ) from None


@contextlib.contextmanager
def _client(client: Any) -> Iterator[Any]:
    """The caller's ``distributed.Client``, or one connected to an address string (closed afterwards)."""
    if isinstance(client, str):
        own = connect(client)
        try:
            yield own
        finally:
            own.close()
        return
    if not all(hasattr(client, name) for name in ("submit", "gather", "cancel")):
        raise InvalidInputError(
            f"client must be a distributed.Client or a scheduler address ('tcp://HOST:PORT'), not {type(client).__name__}"
        )
    yield client


# --- partitions and merging (pure) ----------------------------------------------------------------------
def partition_bounds(n: int, unit: int, partition_rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) covering 0..n, each ``partition_rows`` long (rounded up to a multiple of ``unit``,
    the scan's block and chunk alignment; default :data:`DEFAULT_PARTITION_ROWS`) but the last.

    >>> partition_bounds(10, 4, 5)
    [(0, 8), (8, 10)]
    """
    if partition_rows is not None and (
        isinstance(partition_rows, bool) or not isinstance(partition_rows, (int, np.integer)) or partition_rows < 1
    ):
        raise InvalidInputError(f"partition_rows must be a whole number >= 1 (or None: about 4M rows), not {partition_rows!r}")
    size = int(partition_rows or DEFAULT_PARTITION_ROWS)
    size = max(unit, -(-size // unit) * unit)
    return [(r0, min(r0 + size, n)) for r0 in range(0, n, size)]


def merge_partials(a: Partial, b: Partial, k: int) -> Partial:
    """The top-k of two partial results over disjoint rows, per query and side, in the kernels' order:
    score (``pos`` descending, ``neg`` ascending), then the lower row index. That order is total on
    (score, row), so merging is associative and commutative: any tree of merges gives the same answer."""
    out: Partial = {}
    for side in a:
        idx = np.concatenate([a[side][0], b[side][0]], axis=1)
        val = np.concatenate([a[side][1], b[side][1]], axis=1)
        key = -val if side == "pos" else val
        order = np.lexsort((idx, key), axis=-1)[:, :k]  # last key first: score, then row
        out[side] = (np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1))
    return out


# --- what a task gets, and the tasks --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a task reads: the store's URL and options, the driver's snapshot and its chosen slots."""

    url: str
    storage_options: dict[str, Any] | None
    snapshot: Snapshot
    slots: tuple[int, ...]

    def rows(self) -> RowSource:
        store = LossStore.open(self.url, mode="r", storage_options=self.storage_options)
        return store.rows(self.snapshot, self.slots)


def _identity(payload: Any) -> Any:
    return payload


def _partition(fn: PartitionFn[TaskT], shipped: tuple[_Source, TaskT], r0: int, r1: int) -> Any:
    """One task: the operation's partition function on rows r0 .. r1 - 1 of the store opened by URL."""
    source, task = shipped
    return fn(task, source.rows(), r0, r1)


@dataclasses.dataclass(frozen=True)
class _GramTask:
    kind: str  # a registered Preconditioner's name
    block_rows: int


def _scan_gram(task: _GramTask, rows: RowSource, r0: int, r1: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One partition of a Gram pass: each block's :func:`gram_part` ((K, K) float64 part, subset counts,
    spread), unsummed, so the driver can add them in row order (float sums are not associative).
    K·K·8 bytes per block."""
    return gram_parts(rows, task.kind, task.block_rows, (r0, r1))


# --- the driver -----------------------------------------------------------------------------------------
def _worker_url(store: LossStore) -> str:
    """The URL workers open: a local path made absolute (a worker's working directory is its own)."""
    scheme = urlparse(store.url).scheme
    if scheme == "memory":
        raise InvalidInputError(f"{store.url} is an in-memory store, which Dask workers cannot open; score it in this process")
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = urlparse(store.url).path if scheme == "file" else store.url
        return os.path.abspath(os.path.expanduser(path))
    return store.url


class DaskExecutor(Executor):
    """One distributed request: its client, partitions and task keys; cancels what it started on failure.

    Partitions are whole multiples of the scan's blocks (``scan_rows``, as the single-process scan picks
    them) and of the Gram pass's blocks (``gram_rows``: ``block_rows`` or the store's chunk rows, as
    ``gram_pass`` reads), so each task reads exactly blocks of the single-process passes."""

    local = False

    def __init__(self, client: Any, store: LossStore, rows: RowSource, block_rows: int | None, partition_rows: int | None,
                 storage_options: dict[str, Any] | None):
        super().__init__(store, rows, block_rows)
        self.client = client
        self.gram_rows = int(block_rows or rows.chunk_rows)
        unit = math.lcm(scan_block_rows(rows, block_rows), self.gram_rows, rows.chunk_rows)
        self.bounds = partition_bounds(rows.n_rows, unit, partition_rows)
        self.source = _Source(_worker_url(store), storage_options, rows.snapshot, rows.slots)
        self.tag = f"daunce-{uuid.uuid4().hex[:12]}"
        self.futures: list[Any] = []

    def submit(self, fn: Any, *args: Any, name: str) -> Any:
        future = self.client.submit(fn, *args, key=f"{self.tag}-{name}")
        self.futures.append(future)
        return future

    def scan(self, fn: Any, task: Any, what: str) -> list[Any]:
        # The task (prepared queries, snapshot) goes into the graph once, as a task of its own, not once
        # per partition; unlike client.scatter's data, the scheduler can recompute it when the worker
        # holding it dies.
        shipped = self.submit(_identity, (self.source, task), name=f"{what}-payload")
        return [self.submit(_partition, fn, shipped, r0, r1, name=f"{what}-{r0}") for r0, r1 in self.bounds]

    def gram_pass(self, kind: str) -> Gram:
        parts = self.result(self.scan(_scan_gram, _GramTask(kind, self.gram_rows), "gram"))
        return Gram.from_parts(kind, [p for partition in parts for p in partition], len(self.source.slots))

    def topk(self, fn: PartitionFn[TaskT], task: TaskT, k: int) -> Result:
        level = self.scan(fn, task, "scan")
        depth = 0
        while len(level) > 1:  # a pairwise tree of merges on the workers
            depth += 1
            nxt = [self.submit(merge_partials, level[i], level[i + 1], k, name=f"merge-{depth}-{i}") for i in range(0, len(level) - 1, 2)]
            level = nxt + ([level[-1]] if len(level) % 2 else [])
        best: Result = self.result(level[0])
        return best

    def result(self, futures: Any) -> Any:
        distributed = _distributed()
        try:
            return self.client.gather(futures)
        except DaunceStoreError:
            raise  # a task's own error (a corrupt chunk, ...): as the single-process scan raises it
        except distributed.KilledWorker as e:
            raise DaunceStoreError(
                f"a scan task of {self.source.url} killed its Dask worker repeatedly ({e}); look at the workers' "
                "logs (memory limit? the store unreadable from the workers?) and retry"
            ) from None
        except distributed.client.FutureCancelledError as e:
            raise DaunceStoreError(f"the distributed scan was cancelled ({e}); the cluster or its client went away") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.cancel(self.futures)


@contextlib.contextmanager
def executor(store: LossStore, snapshot: Snapshot, slots: Sequence[int], block_rows: int | None = None, *,
             client: Client | str | None = None, partition_rows: int | None = None,
             storage_options: dict[str, Any] | None = None) -> Iterator[Executor]:
    """Where an operation on the rows of ``slots`` runs: this process (``client`` None), or the Dask cluster
    of ``client`` (a ``distributed.Client`` or a scheduler address ``tcp://HOST:PORT``, connected for this
    call: a DaunceStoreError within :data:`CONNECT_TIMEOUT_S` when nothing answers), one task per partition
    of about ``partition_rows`` rows, each opening the store's URL with ``storage_options``."""
    rows = store.rows(snapshot, slots)
    if client is None:
        if partition_rows is not None:
            raise InvalidInputError("partition_rows splits a distributed scan; give client= (a Dask client or scheduler address) too")
        yield LocalExecutor(store, rows, block_rows)
        return
    partition_bounds(1, 1, partition_rows)  # checked, as the store's URL, before any connection is made
    _worker_url(store)
    with _client(client) as c:
        run = DaskExecutor(c, store, rows, block_rows, partition_rows, storage_options)
        try:
            yield run
        finally:
            run.close()
