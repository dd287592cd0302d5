"""Exact distributed scoring on a Dask cluster: top-k, aggregate influence and self-influence.

The driver (the caller's process) fixes the snapshot, validates the request and prepares the queries once,
exactly as :func:`~daunce_store.scoring.topk_store` does; the train rows are split into partitions that are
whole multiples of the scan's block rows (and of the store's chunk rows), and one task per partition opens
the store by URL, read-only, and runs the ordinary streaming accumulator over the blocks of its rows
(``iter_row_blocks(row_range=...)``, with the snapshot's slots: columns committed after the driver's
snapshot never enter). Each task returns its per-query top-k (global row indices, scores) per side, O(m·k);
partial results merge pairwise in a tree on the workers.

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
  order, as :meth:`Gram.accumulate` does, so the preconditioner has the same bits as well. It goes into the
  store handle's cache, where the driver's :func:`scoring_request` finds it, and is persisted in the store
  (``stored_gram``); a matrix another process persisted for the same columns is used without a pass.

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
from threadpoolctl import threadpool_limits

from daunce_store._optional import import_optional
from daunce_store.errors import DaunceStoreError, InvalidInputError
from daunce_store.scoring._attribution import (
    Attribution,
    check_aggregate,
    check_query_request,
    check_self_influence,
    kernel_queries,
    measure_inputs,
    measure_plan,
    push_train_rows,
    scan_block_rows,
    scoring_request,
)
from daunce_store.scoring._backend import make_accumulator, row_variance
from daunce_store.scoring._measures import (
    DEFAULT_MEASURE,
    Gram,
    Prepared,
    column_names,
    gram_part,
    metric_self_scores,
    recorded_draws,
    stored_gram,
)
from daunce_store.scoring._numpy import check_underflow
from daunce_store.scoring._preconditioners import preconditioner_named
from daunce_store.store import LossStore, Snapshot

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_PARTITION_ROWS",
    "connect",
    "influence_distributed",
    "merge_partials",
    "partition_bounds",
    "self_influence_distributed",
    "topk_distributed",
]

# About 4M rows per task: at K = 64 a partition is 1 GB of losses, long enough (a second or more of
# reading and scoring) that a task's fixed cost — opening the store, shipping m·k results — stays small,
# and 10M rows still make 3 tasks to spread. Rounded up to whole blocks.
DEFAULT_PARTITION_ROWS = 1 << 22
# Seconds to wait for a scheduler given by address: a wrong or dead address fails, it does not hang.
CONNECT_TIMEOUT_S = 10.0

Partial = dict[str, tuple[np.ndarray, np.ndarray]]  # {side: (indices (m, k') int64, scores (m, k') float32)}


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
    positions: np.ndarray | None

    def store(self) -> LossStore:
        return LossStore.open(self.url, mode="r", storage_options=self.storage_options)

    def blocks(self, r0: int, r1: int, block_rows: int, positioned: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """The snapshot's blocks of rows r0 .. r1 - 1 (``positioned``: positions applied, as
        ``ScoringRequest.blocks``; else every slot, as the Gram pass reads them)."""
        for offset, block in self.store().iter_row_blocks(snapshot=self.snapshot, slots=list(self.slots),
                                                   block_rows=block_rows, row_range=(r0, r1)):
            yield offset, block if self.positions is None or not positioned else np.ascontiguousarray(block[:, self.positions])


@dataclasses.dataclass(frozen=True)
class _TopKTask:
    source: _Source
    block_rows: int
    prepared: Prepared
    queries: np.ndarray
    queries_prepared: bool
    k: int
    sides: tuple[str, ...]
    backend: str


@dataclasses.dataclass(frozen=True)
class _GramTask:
    source: _Source
    block_rows: int
    kind: str  # a registered Preconditioner's name


@dataclasses.dataclass(frozen=True)
class _SelfTask:
    source: _Source
    block_rows: int
    metric: np.ndarray | None  # None: the loss variance (cov)
    k: int
    sides: tuple[str, ...]
    backend: str


def _identity(payload: Any) -> Any:
    return payload


def _scan_topk(task: _TopKTask, r0: int, r1: int) -> Partial:
    """One partition of :func:`~daunce_store.scoring.topk_store`: the same accumulator, on rows r0 .. r1 - 1."""
    acc = make_accumulator(task.queries, min(task.k, r1 - r0), task.prepared.kernel, task.sides, task.backend,
                           queries_prepared=task.queries_prepared)
    src = task.source  # as topk_store: partitions on chunk boundaries score each row as one process does, to the bit
    push_train_rows(acc, task.prepared, src.store(), src.snapshot, list(src.slots), src.positions,
                    lambda: src.blocks(r0, r1, task.block_rows), row_range=(r0, r1))
    return acc.finish()


def _scan_self(task: _SelfTask, r0: int, r1: int) -> Partial:
    """One partition of :func:`~daunce_store.scoring.self_influence`."""
    acc = make_accumulator(np.zeros((1, 2), np.float32), min(task.k, r1 - r0), "cov", task.sides, task.backend,
                           queries_prepared=True)
    for offset, block in task.source.blocks(r0, r1, task.block_rows):
        acc.push_scores(offset, row_variance(block, task.backend) if task.metric is None else metric_self_scores(block, task.metric))
    return acc.finish()


def _scan_gram(task: _GramTask, r0: int, r1: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One partition of :meth:`Gram.accumulate`: each block's :func:`gram_part` ((K, K) float64 part, subset
    counts, spread), unsummed, so the driver can add them in row order (float sums are not associative).
    K·K·8 bytes per block."""
    snapshot, slots = task.source.snapshot, task.source.slots
    draws = recorded_draws(snapshot, slots) if preconditioner_named(task.kind).needs_draws else []
    names = column_names(snapshot, slots)
    with threadpool_limits(1, user_api="blas"):  # as in Gram.accumulate: the same GEMM path, the same bits
        return [gram_part(task.kind, block, offset, draws, names)
                for offset, block in task.source.blocks(r0, r1, task.block_rows, positioned=False)]


def _gram_from_parts(kind: str, parts: list[tuple[np.ndarray, np.ndarray, str]], num: int) -> Gram:
    """The sums of :meth:`Gram.accumulate`, in its order."""
    return Gram.from_parts(kind, parts, num)


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


class _Run:
    """One distributed request: its client, partitions and task keys; cancels what it started on failure.

    Partitions are whole multiples of the scan's blocks (``scan_rows``, as the single-process scan picks
    them) and of the Gram pass's blocks (``gram_rows``: ``block_rows`` or the store's chunk rows, as
    ``gram_for`` reads), so each task reads exactly blocks of the single-process passes."""

    def __init__(self, client: Any, store: LossStore, snapshot: Snapshot, slots: Sequence[int], positions: np.ndarray | None,
                 block_rows: int | None, partition_rows: int | None, storage_options: dict[str, Any] | None):
        self.client = client
        self.scan_rows = scan_block_rows(store, slots, block_rows)
        self.gram_rows = int(block_rows or store.chunk_rows)
        unit = math.lcm(self.scan_rows, self.gram_rows, store.chunk_rows)
        self.bounds = partition_bounds(store.n_train, unit, partition_rows)
        self.source = _Source(_worker_url(store), storage_options, snapshot, tuple(int(s) for s in slots), positions)
        self.tag = f"daunce-{uuid.uuid4().hex[:12]}"
        self.futures: list[Any] = []

    def submit(self, fn: Any, *args: Any, name: str) -> Any:
        future = self.client.submit(fn, *args, key=f"{self.tag}-{name}")
        self.futures.append(future)
        return future

    def scan(self, fn: Any, payload: Any, what: str) -> list[Any]:
        # The payload (prepared queries, snapshot) goes into the graph once, as a task of its own, not once
        # per partition; unlike client.scatter's data, the scheduler can recompute it when the worker
        # holding it dies.
        shipped = self.submit(_identity, payload, name=f"{what}-payload")
        return [self.submit(fn, shipped, r0, r1, name=f"{what}-{r0}") for r0, r1 in self.bounds]

    def gram(self, kind: str) -> Gram:
        parts = self.result(self.scan(_scan_gram, _GramTask(self.source, self.gram_rows, kind), "gram"))
        return _gram_from_parts(kind, [p for partition in parts for p in partition], len(self.source.slots))

    def topk(self, fn: Any, payload: Any, k: int) -> Partial:
        level = self.scan(fn, payload, "scan")
        depth = 0
        while len(level) > 1:  # a pairwise tree of merges on the workers
            depth += 1
            nxt = [self.submit(merge_partials, level[i], level[i + 1], k, name=f"merge-{depth}-{i}") for i in range(0, len(level) - 1, 2)]
            level = nxt + ([level[-1]] if len(level) % 2 else [])
        return self.result(level[0])

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
def _run(client: Any, store: LossStore, snapshot: Snapshot, slots: Sequence[int], positions: np.ndarray | None,
         block_rows: int | None, partition_rows: int | None, storage_options: dict[str, Any] | None) -> Iterator[_Run]:
    partition_bounds(1, 1, partition_rows)  # checked, as the store's URL, before any connection is made
    _worker_url(store)
    with _client(client) as c:
        run = _Run(c, store, snapshot, slots, positions, block_rows, partition_rows, storage_options)
        try:
            yield run
        finally:
            run.close()


def _ensure_gram(run: _Run, store: LossStore, kind: str | None, slots: Sequence[int]) -> None:
    """Put the Gram of these slots into the store handle's cache (where ``gram_for`` looks): the handle's,
    the store's persisted one, or one pass on the cluster (then persisted, as ``gram_for`` does)."""
    if kind is not None:
        stored_gram(store, run.source.snapshot, slots, kind, lambda: run.gram(kind))


def topk_distributed(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    client: Any,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "both",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    columns: Sequence[int] | None = None,
    block_rows: int | None = None,
    aggregate: str | None = None,
    partition_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attribution:
    """:func:`~daunce_store.scoring.topk_store` on a Dask cluster: the same answer (indices and order; scores
    to float32 tolerance, the same bits where driver and workers run the same build), one task per
    partition of about ``partition_rows`` train rows.

    ``client``: a ``distributed.Client`` or a scheduler address (``tcp://HOST:PORT``; connected for this call,
    a DaunceStoreError within :data:`CONNECT_TIMEOUT_S` when nothing answers). ``storage_options``: what the
    workers open the store's URL with (the driver's own, for an object store); ``backend`` is resolved on each
    worker.

    >>> from distributed import Client                                            # doctest: +SKIP
    >>> topk_distributed(store, "test", k=10, client=Client("tcp://10.0.0.5:8786"))  # doctest: +SKIP
    """
    check_aggregate(aggregate)
    # scoring_request's checks, before the Gram pass (which runs on the cluster), so bad input fails before any scan.
    check_query_request(store, query_set, queries, k, measure, side)
    snap, slots, positions, resolved = measure_plan(store, measure, snapshot, query_set, columns, block_rows)
    with _run(client, store, snap, slots, positions, block_rows, partition_rows, storage_options) as run:
        _ensure_gram(run, store, resolved.preconditioner, slots)
        req = scoring_request(store, query_set, queries, k, measure, side, snap, columns, block_rows)
        prep = req.prepared()
        q, prepared, names = kernel_queries(req, prep, query_set, queries, aggregate)
        task = _TopKTask(run.source, run.scan_rows, prep, q, prepared, int(k), req.sides, backend)
        best = run.topk(_scan_topk, task, int(k))
    # On the merged answer, not per partition: a partition's rows may all score 0 where others do not.
    best = check_underflow(best, q, prepared, prep.kernel, names, req.measure.name)
    return Attribution.from_result(names, store.train_ids_at, best, req.measure.name, req.num_columns)


def influence_distributed(store: LossStore, query_set: str, queries: Sequence[str] | None = None, **options: Any) -> Attribution:
    """:func:`~daunce_store.scoring.influence` on a Dask cluster (the options of :func:`topk_distributed`)."""
    return topk_distributed(store, query_set, queries, aggregate="mean", **options)


def self_influence_distributed(
    store: LossStore,
    *,
    client: Any,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "pos",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
    partition_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attribution:
    """:func:`~daunce_store.scoring.self_influence` on a Dask cluster, with the same answer (see
    :func:`topk_distributed` for ``client``, ``partition_rows`` and ``storage_options``)."""
    sides = check_self_influence(store, k, measure, side)
    snap, slots, _, resolved = measure_plan(store, measure, snapshot, None, None, block_rows)
    with _run(client, store, snap, slots, None, block_rows, partition_rows, storage_options) as run:
        _ensure_gram(run, store, resolved.preconditioner, slots)
        snap, slots, _, resolved, gram = measure_inputs(store, measure, snap, None, None, block_rows)
        metric = None if gram is None else gram.preconditioner()
        best = run.topk(_scan_self, _SelfTask(run.source, run.scan_rows, metric, int(k), sides, backend), int(k))
    name = "var" if resolved.name == "cov" else resolved.name
    return Attribution.from_result(("<self>",), store.train_ids_at, best, name, len(slots))
