"""Where a scan runs: one function per scoring operation, run by an executor.

An operation (:func:`~daunce_store.scoring.topk_store`, :func:`~daunce_store.scoring.self_influence`) is a
task — the prepared queries or metric, k, sides, backend — and a partition function ``fn(task, rows, r0, r1)``
that scores rows r0 .. r1 - 1 of a :class:`~daunce_store.store.RowSource` into a partial top-k. The executor
decides where the partitions run and how their results come together:

* :class:`LocalExecutor`: this process, one partition of every row (the store's own :meth:`rows`: memory for
  a server, the fused Rust pass or the block path for a store);
* ``DaskExecutor`` (:mod:`._distributed`): one task per partition on a Dask cluster, each opening the store by
  URL, partial results merged on the workers.

The Gram pass of the preconditioned measures is the executor's too (:meth:`Executor.gram`), so every
measure's matrix comes from the same place, persisted in the store either way.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from daunce_store.scoring._accumulator import Accumulator, Result
from daunce_store.scoring._backend import make_accumulator, push_checked, row_variance
from daunce_store.scoring._measures import Gram, Prepared, gram_pass, metric_self_scores, stored_gram

if TYPE_CHECKING:
    from daunce_store.store import LossStore, RowSource

__all__ = ["Executor", "LocalExecutor", "SCAN_BLOCK_BYTES", "SelfTask", "TopKTask", "push_train_rows", "scan_block_rows",
           "scan_self", "scan_topk"]

# A scoring scan's blocks: whole row chunks of what is read (a block that cuts a chunk reads it twice),
# about this many bytes. The iter_row_blocks default (the store's 2^18-row chunks) makes 256 MB blocks
# at K = 256, which the Rust reader assembles at half the speed of 64 MB ones (2^16 rows, one packed
# chunk per group) and which hold 4x the memory; at K = 64 the size made no measurable difference
# (bench/RESULTS.md, "Read path").
SCAN_BLOCK_BYTES = 32 << 20

TaskT = TypeVar("TaskT")
PartitionFn = Callable[[TaskT, "RowSource", int, int], Result]


def scan_block_rows(rows: RowSource, block_rows: int | None = None) -> int:
    """``block_rows`` when given, else the rows of a scoring block: the most whole scan units of ``rows``
    (``RowSource.unit_rows``: 2^16 rows of a compacted store, so no chunk is read twice) within
    :data:`SCAN_BLOCK_BYTES`, at least one."""
    if block_rows is not None:
        return int(block_rows)
    unit = rows.unit_rows
    return unit * max(1, SCAN_BLOCK_BYTES // (unit * 4 * max(len(rows.slots), 1)))


@dataclasses.dataclass(frozen=True)
class TopKTask:
    """A top-k scan: the prepared measure and the kernel's queries; ``positions``: the request's column
    selection (None: every slot of the rows)."""

    prepared: Prepared
    queries: np.ndarray
    queries_prepared: bool
    k: int
    sides: tuple[str, ...]
    backend: str
    positions: np.ndarray | None
    block_rows: int | None


@dataclasses.dataclass(frozen=True)
class SelfTask:
    """A self-influence scan: ``metric`` M (None: the loss variance, cov)."""

    metric: np.ndarray | None
    k: int
    sides: tuple[str, ...]
    backend: str
    block_rows: int | None


def push_train_rows(acc: Accumulator, prep: Prepared, rows: RowSource, positions: np.ndarray | None,
                    block_rows: int | None = None, row_range: tuple[int, int] | None = None) -> None:
    """Feed rows ``row_range`` (default all) of ``rows`` to ``acc``. Where the accumulator reads chunk files
    itself and the source offers a fused read-and-score pass (the Rust kernel on a local store), it scores
    the stored rows while they are in cache, a normalised preconditioned measure's transform applied by the
    kernel (``takes_transform``); else the blocks are pushed through the measure's transform."""
    in_kernel = prep.transform is not None and acc.takes_transform
    if in_kernel:
        assert prep.transform is not None
        acc.set_transform(prep.transform)
    if prep.row_scales is not None:  # the caller checked the accumulator's takes_row_scales
        acc.set_row_scales(prep.row_scales)
    fused = (prep.transform is None or in_kernel) and positions is None and acc.takes_chunks
    if fused and rows.push_into(acc, row_range):
        return
    for offset, block in rows.blocks(scan_block_rows(rows, block_rows), row_range):
        block = block if positions is None else np.ascontiguousarray(block[:, positions])
        push_checked(acc, offset, block if in_kernel else prep.block(block))


def scan_topk(task: TopKTask, rows: RowSource, r0: int, r1: int) -> Result:
    """Rows r0 .. r1 - 1 of a top-k scan (partitions on chunk boundaries score each row as one process does,
    to the bit)."""
    acc = make_accumulator(task.queries, min(task.k, r1 - r0), task.prepared.kernel, task.sides, task.backend,
                           queries_prepared=task.queries_prepared)
    whole = (r0, r1) == (0, rows.n_rows)
    push_train_rows(acc, task.prepared, rows, task.positions, task.block_rows, None if whole else (r0, r1))
    return acc.finish()


def scan_self(task: SelfTask, rows: RowSource, r0: int, r1: int) -> Result:
    """Rows r0 .. r1 - 1 of a self-influence scan: one "query" whose scores are pushed precomputed."""
    acc = make_accumulator(np.zeros((1, 2), np.float32), min(task.k, r1 - r0), "cov", task.sides, task.backend,
                           queries_prepared=True)
    for offset, block in rows.blocks(scan_block_rows(rows, task.block_rows), (r0, r1)):
        acc.push_scores(offset, row_variance(block, task.backend) if task.metric is None else metric_self_scores(block, task.metric))
    return acc.finish()


class Executor(abc.ABC):
    """Runs an operation's partitions over the rows of one snapshot's columns of ``store``.

    ``local``: whether the partitions run in this process (where a pass for the -corr measures' row scales
    may run before the scan; a cluster uses them only when persisted)."""

    local: bool

    def __init__(self, store: LossStore, rows: RowSource, block_rows: int | None):
        self.store, self.rows, self.block_rows = store, rows, block_rows

    def gram(self, kind: str | None) -> Gram | None:
        """The Gram of ``kind`` over the rows' columns (None for a measure without one): the handle's, the
        store's persisted one, or :meth:`gram_pass` (then persisted)."""
        if kind is None:
            return None
        return stored_gram(self.store, self.rows.snapshot, self.rows.slots, kind, lambda: self.gram_pass(kind))

    @abc.abstractmethod
    def gram_pass(self, kind: str) -> Gram:
        """One Gram pass over every row, summed in row order (the bits of :func:`gram_pass`)."""

    @abc.abstractmethod
    def topk(self, fn: PartitionFn[TaskT], task: TaskT, k: int) -> Result:
        """``fn`` over partitions covering every row, their partial top-k merged."""


class LocalExecutor(Executor):
    """This process: one partition of every row."""

    local = True

    def gram_pass(self, kind: str) -> Gram:
        return gram_pass(self.rows, kind, self.block_rows)

    def topk(self, fn: PartitionFn[TaskT], task: TaskT, k: int) -> Result:
        return fn(task, self.rows, 0, self.rows.n_rows)
