"""Attribution over a store: top-k per query, aggregate influence of a query set, self-influence.

These turn store contents into kernel calls and kernel output into an :class:`Attribution` table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daunce_store.errors import InvalidInputError, NotEnoughColumnsError
from daunce_store.scoring._backend import MEASURES, SIDES, make_accumulator, row_variance, topk
from daunce_store.scoring._numpy import prepare_queries

if TYPE_CHECKING:
    import pandas as pd

    from daunce_store.store import LossStore, Snapshot

__all__ = ["Attribution", "topk_store", "influence", "self_influence", "resolve_sides", "check_k"]

RECORD_FIELDS = ("query", "side", "rank", "train_id", "train_index", "score")


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Top-k train examples per query and side.

    ``indices[side]`` and ``scores[side]`` are (m, k) arrays; row j belongs to ``queries[j]``.
    """

    queries: tuple[str, ...]
    train_ids: np.ndarray
    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    measure: str
    num_columns: int

    def records(self) -> list[dict[str, Any]]:
        """One dict per (query, side, rank): {query, side, rank, train_id, train_index, score}."""
        out = []
        for j, q in enumerate(self.queries):
            for side in self.indices:
                for rank, (i, s) in enumerate(zip(self.indices[side][j], self.scores[side][j]), start=1):
                    out.append(
                        {"query": q, "side": side, "rank": rank, "train_id": str(self.train_ids[i]),
                         "train_index": int(i), "score": float(s)}
                    )
        return out

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame.from_records(self.records(), columns=list(RECORD_FIELDS))

    def write(self, path: str | os.PathLike[str], fmt: str | None = None) -> None:
        """Write as json (a list of records), jsonl, csv or parquet; the format defaults to the suffix."""
        import json

        fmt = fmt or os.fspath(path).rsplit(".", 1)[-1]
        if fmt == "json":
            with open(path, "w") as f:
                json.dump(self.records(), f, indent=1)
        elif fmt == "jsonl":
            self.to_pandas().to_json(path, orient="records", lines=True)
        elif fmt == "csv":
            self.to_pandas().to_csv(path, index=False)
        elif fmt == "parquet":
            self.to_pandas().to_parquet(path, index=False)
        else:
            raise InvalidInputError(f"unknown output format {fmt!r}; use json, jsonl, csv or parquet")


def resolve_sides(side: str) -> tuple[str, ...]:
    if side == "both":
        return SIDES
    if side not in SIDES:
        raise InvalidInputError(f"side must be pos, neg or both, not {side!r}")
    return (side,)


def check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be a whole number >= 1, not {k!r}")
    if k > n:
        raise InvalidInputError(f"k={k} is larger than the training set (n={n}); use k <= {n}")


def _check_columns(num: int, query_set: str | None) -> None:
    if num < 2:
        where = f" with losses for query set {query_set!r}" if query_set else ""
        raise NotEnoughColumnsError(
            f"scoring needs at least 2 committed perturbation columns{where}, the store has {num}; "
            "run more perturbations (`daunce perturb`) or append columns (`daunce append`)"
        )


def _query_rows(store: LossStore, query_set: str, queries: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    ids = store.query_ids(query_set)
    if queries is None:
        return np.arange(len(ids)), tuple(ids.tolist())
    if len(queries) == 0:
        raise InvalidInputError("no query ids given; omit them to score the whole query set")
    rows = store.query_index(query_set, queries)
    return rows, tuple(str(q) for q in queries)


def query_scoring_inputs(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None,
    k: int,
    measure: str,
    side: str,
    snapshot: Snapshot | None,
) -> tuple[tuple[str, ...], Snapshot, np.ndarray, tuple[str, ...], np.ndarray]:
    """Validate a query-scoring request and load its queries: (sides, snapshot, query rows, query names,
    (m, K) query losses over the snapshot's columns for ``query_set``)."""
    if measure not in MEASURES:
        raise InvalidInputError(f"measure must be one of {MEASURES}, not {measure!r}")
    sides = resolve_sides(side)
    check_k(k, store.n_train)
    snap = snapshot or store.snapshot()
    rows, names = _query_rows(store, query_set, queries)
    q = store.query_losses(query_set, snapshot=snap)[rows]
    _check_columns(q.shape[1], query_set)
    return sides, snap, rows, names, q


def topk_store(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    k: int = 10,
    measure: str = "cov",
    side: str = "both",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
) -> Attribution:
    """Top-k proponents/opponents among train examples for each query of ``query_set``."""
    sides, snap, rows, names, q = query_scoring_inputs(store, query_set, queries, k, measure, side, snapshot)
    blocks = store.iter_row_blocks(snapshot=snap, query_set=query_set, block_rows=block_rows)
    result = topk(blocks, q, k, measure, sides, backend)
    return Attribution(names, store.train_ids, {s: result[s][0] for s in sides}, {s: result[s][1] for s in sides}, measure, q.shape[1])


def influence(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    k: int = 10,
    measure: str = "cov",
    side: str = "both",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
) -> Attribution:
    """Aggregate influence of each train example on a whole query set: the mean of its scores over the
    queries (exact: scores are linear in the prepared query rows), top-k per side."""
    sides, snap, rows, _, q = query_scoring_inputs(store, query_set, queries, k, measure, side, snapshot)
    mean_query = prepare_queries(q, measure).mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
    blocks = store.iter_row_blocks(snapshot=snap, query_set=query_set)
    result = topk(blocks, mean_query, k, measure, sides, backend, queries_prepared=True)
    label = f"{query_set}:mean" if queries is None else f"{query_set}:mean-of-{len(rows)}"
    return Attribution((label,), store.train_ids, {s: result[s][0] for s in sides}, {s: result[s][1] for s in sides}, measure, q.shape[1])


def self_influence(
    store: LossStore,
    *,
    k: int = 10,
    side: str = "pos",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
) -> Attribution:
    """Self-influence var_k(L_i) = cov(i, i) per train example; top-k largest (``pos``: likely mislabeled
    or outliers) and/or smallest (``neg``). Same streaming selection as :func:`topk_store`."""
    sides = resolve_sides(side)
    check_k(k, store.n_train)
    snap = snapshot or store.snapshot()
    _check_columns(len(snap), None)
    # One "query" whose scores are pushed precomputed: the row variances of each block.
    acc = make_accumulator(np.zeros((1, 2), np.float32), k, "cov", sides, backend, queries_prepared=True)
    for offset, block in store.iter_row_blocks(snapshot=snap, block_rows=block_rows):
        acc.push_scores(offset, row_variance(block, backend))
    best = acc.finish()
    return Attribution(
        ("<self>",), store.train_ids, {s: best[s][0] for s in sides}, {s: best[s][1] for s in sides}, "var", len(snap),
    )
