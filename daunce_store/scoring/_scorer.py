"""A store's train rows kept on a torch device for repeated top-k (:func:`scorer`, ``Store.scorer``): the
store-level half of the torch backend, above the scan (:mod:`._attribution`) and the torch kernel
(:mod:`._torch`), which knows nothing of stores."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring._attribution import (Attribution, _warn_constant_queries, check_aggregate, check_k, kernel_queries,
                                               measure_inputs, resolve_sides, scoring_request)
from daunce_store.scoring._measures import DEFAULT_MEASURE, prepare, resolve_measure
from daunce_store.scoring._numpy import check_underflow
from daunce_store.scoring._torch import TorchScorer

if TYPE_CHECKING:
    from daunce_store.store import LossStore, Snapshot

__all__ = ["StoreScorer", "scorer"]


class StoreScorer:
    """A store's train rows prepared for one measure and kept on a torch device: what :func:`scorer`
    (``Store.scorer``) returns. Each :meth:`topk` then reads only query losses, never the train rows.

    The answer equals ``store.topk(..., backend="torch")`` on the same snapshot and columns.
    """

    def __init__(self, store: LossStore, query_set: str | None, *, measure: str, snapshot: Snapshot | None,
                 columns: Sequence[int] | None, device: Any, allow_tf32: bool, block_rows: int | None):
        resolve_measure(measure)  # a bad name fails before any reading
        if query_set is not None:
            store.query_ids(query_set)  # an unknown query set fails here too
        snap, slots, positions, resolved, gram = measure_inputs(store, measure, snapshot, query_set, columns, block_rows)
        self.store, self.query_set, self.snapshot, self.columns = store, query_set, snap, columns
        self.block_rows, self.measure, self.gram, self.positions = block_rows, resolved, gram, positions
        self.num_columns = len(slots) if positions is None else len(positions)
        # The kernel's row preparation and the measure's block transform depend on the columns, not the queries.
        proto = prepare(resolved, np.zeros((1, self.num_columns), np.float32), gram, positions)

        def blocks() -> Iterator[tuple[int, np.ndarray]]:
            for offset, block in store.rows(snap, slots).blocks(block_rows):
                yield offset, proto.block(block if positions is None else np.ascontiguousarray(block[:, positions]))

        self.kernel = TorchScorer.from_blocks(blocks(), proto.kernel, n_rows=store.n_train, device=device,
                                              allow_tf32=allow_tf32)

    @property
    def device(self) -> Any:
        return self.kernel.device

    def topk(self, queries: Sequence[str] | None = None, *, k: int = 10, side: str = "both",
             aggregate: str | None = None) -> Attribution:
        """Top-k per query of the scorer's query set (``aggregate="mean"``: of their mean score), as
        :meth:`Store.topk`."""
        check_aggregate(aggregate)
        if self.query_set is None:
            raise InvalidInputError(
                "this scorer was made without a query set; make it with store.scorer('<query set>') "
                "or pass query losses to topk_losses"
            )
        req = scoring_request(self.store, self.query_set, queries, k, self.measure.name, side, self.snapshot,
                              self.columns, self.block_rows)
        prep = req.prepared()
        q, prepared, names = kernel_queries(req, prep, self.query_set, queries, aggregate)
        result = check_underflow(self.kernel.select(q, k, req.sides, queries_prepared=prepared), q, prepared, prep.kernel,
                                 names, req.measure.name)
        return Attribution.from_result(names, self.store.train_ids_at, result, req.measure.name, req.num_columns)

    def topk_losses(self, losses: np.ndarray, *, k: int = 10, side: str = "both",
                    names: Sequence[str] | None = None) -> Attribution:
        """Top-k for new query loss rows (m, K): one loss per column of the scorer (the snapshot's
        columns for its query set, in their order, ``columns`` applied)."""
        sides = resolve_sides(side)
        check_k(k, self.store.n_train)
        q = np.asarray(losses, dtype=np.float32)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] != self.num_columns:
            raise InvalidInputError(
                f"query losses must be an (m, {self.num_columns}) array (one loss per column of this scorer), "
                f"not shape {np.shape(losses)}"
            )
        if not np.isfinite(q).all():
            raise InvalidInputError(f"query losses hold NaN or inf (row {int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])})")
        names = tuple(str(n) for n in names) if names is not None else tuple(str(j) for j in range(q.shape[0]))
        if len(names) != q.shape[0]:
            raise InvalidInputError(f"{len(names)} names for {q.shape[0]} query rows")
        _warn_constant_queries(q, names)
        prep = prepare(self.measure, q, self.gram, self.positions)
        qk, prepared = prep.kernel_queries
        result = check_underflow(self.kernel.select(qk, k, sides, queries_prepared=prepared), qk, prepared, prep.kernel,
                                 names, self.measure.name)
        return Attribution.from_result(names, self.store.train_ids_at, result, self.measure.name, self.num_columns)


def scorer(store: LossStore, query_set: str | None = None, *, measure: str = DEFAULT_MEASURE, device: Any = None,
           snapshot: Snapshot | None = None, columns: Sequence[int] | None = None, allow_tf32: bool = False,
           block_rows: int | None = None) -> StoreScorer:
    """Read the store's train rows once, prepare them for ``measure`` and keep them on a torch ``device``
    (default: cuda when available, else cpu), for repeated top-k without reading the store again.

    ``query_set`` fixes the columns (those with losses for it; None: every committed column). Needs torch
    (``pip install 'daunce-store[torch]'``).

    >>> s = store.scorer("test", device="cuda")                 # doctest: +SKIP
    >>> s.topk(["q0", "q1"], k=10).to_pandas()                    # doctest: +SKIP
    >>> s.topk_losses(new_losses, k=10)                           # doctest: +SKIP
    """
    return StoreScorer(store, query_set, measure=measure, snapshot=snapshot, columns=columns, device=device,
                       allow_tf32=allow_tf32, block_rows=block_rows)
