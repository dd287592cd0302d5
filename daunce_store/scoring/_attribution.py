"""Attribution over a store: top-k per query, aggregate influence of a query set, self-influence.

These turn store contents into kernel calls and kernel output into an :class:`Attribution` table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from daunce_store.errors import ConstantQueryWarning, InvalidInputError, NotEnoughColumnsError
from daunce_store.store import TABLE_FORMATS, DataFile, json_ready, validate_losses, write_frames, write_json, write_records
from daunce_store.store._inputs import ID_FIELD
from daunce_store.scoring._backend import accumulator_class
from daunce_store.scoring._distributed import executor
from daunce_store.scoring._executor import Executor, LocalExecutor, SelfTask, TopKTask, scan_block_rows, scan_self, scan_topk
from daunce_store.scoring._vocabulary import SIDES, Side, side_choice
from daunce_store.scoring._numpy import _TINY, check_underflow, query_spread, score_overflow_error, score_underflow_error, underflowed
from daunce_store.scoring._measures import (
    DEFAULT_MEASURE,
    MEASURES,
    Gram,
    Measure,
    Prepared,
    gram_for,
    prepare,
    resolve_measure,
    stored_row_scales,
)

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

    from daunce_store.store import LossStore, Snapshot

__all__ = ["Attribution", "RowIds", "envelope", "Scores", "topk_store", "influence", "scores", "self_influence", "resolve_sides", "check_k"]

RECORD_FIELDS = ("query", "side", "rank", "train_id", "train_index", "score")


class RowIds:
    """The ids of some train rows, indexed by row number like the whole ``store.train_ids`` array
    (``ids[i]``, ``ids[indices]``), but holding only the rows a result lists: naming a top-k reads k ids
    (``LossStore.train_ids_at``), not all n. A row not listed is a KeyError."""

    __slots__ = ("rows", "ids")

    def __init__(self, rows: np.ndarray, ids: np.ndarray):
        self.rows = rows  # sorted, unique
        self.ids = ids

    @classmethod
    def of(cls, rows: np.ndarray, train_ids: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> RowIds:
        """The ids of ``rows``, from ``train_ids``: all ids (an array) or a lookup of some rows
        (``store.train_ids_at``)."""
        wanted = np.unique(np.asarray(rows, dtype=np.int64).ravel())
        ids = train_ids(wanted) if callable(train_ids) else np.asarray(train_ids)[wanted]
        return cls(wanted, np.asarray(ids, dtype=str))

    def __getitem__(self, row: Any) -> Any:
        idx = np.asarray(row, dtype=np.int64)
        pos = np.searchsorted(self.rows, idx).clip(max=max(len(self.rows) - 1, 0))
        hit = self.rows[pos] == idx if len(self.rows) else np.zeros(idx.shape, bool)
        if not np.all(hit):
            missing = int(idx[~hit].flat[0]) if idx.ndim else int(idx)
            raise KeyError(f"train row {missing} is not listed in this result; read any row's id with store.train_ids_at(rows)")
        return self.ids[pos]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"RowIds({len(self.rows)} rows)"


def envelope(measure: str, num_columns: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A ranking's JSON answer, the same from ``daunce topk --format json`` and ``daunce serve``'s API:
    ``{"measure", "num_columns", "records"}``, every score finite (the kernels refuse inf and NaN; were one
    not, this raises rather than write a null score)."""
    return {"measure": measure, "num_columns": int(num_columns), "records": json_ready(records, what="the ranking")}


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Top-k train examples per query and side.

    ``indices[side]`` and ``scores[side]`` are (m, k) arrays; row j belongs to ``queries[j]``.
    ``train_ids[i]`` is the id of a listed train row i (only listed rows are held; see :class:`RowIds`).
    ``train_data`` / ``query_data`` (from :meth:`with_data`): the data-file row of each listed train id /
    query id, {column: value}; their columns join the records as ``train_<column>`` / ``query_<column>``.
    """

    queries: tuple[str, ...]
    train_ids: RowIds
    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    measure: str
    num_columns: int
    train_data: dict[str, dict[str, Any]] | None = None
    query_data: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_result(cls, queries: tuple[str, ...], train_ids: np.ndarray | Callable[[np.ndarray], np.ndarray],
                    result: dict[str, tuple[np.ndarray, np.ndarray]], measure: str, num_columns: int) -> Attribution:
        """From a kernel result ``{side: (indices, scores)}``; ``train_ids``: all ids, or a lookup of
        some rows' ids (``store.train_ids_at``: reads only the listed rows' id chunks)."""
        indices = {s: r[0] for s, r in result.items()}
        listed = np.concatenate([i.ravel() for i in indices.values()]) if indices else np.empty(0, np.int64)
        return cls(queries, RowIds.of(listed, train_ids), indices, {s: r[1] for s, r in result.items()}, measure, num_columns)

    def with_data(self, train: DataFile | None = None, queries: DataFile | None = None) -> Attribution:
        """This result with the data-file rows of its listed train examples (``train``) and of its queries
        (``queries``: the query set's file; not for an aggregate), matched by the file's ``id`` column, else
        its row numbers (the rule of ``select``). A listed id the file lacks is an InvalidInputError."""
        train_data = self.train_data if train is None else _rows_by_id(train, self.train_ids.ids, "listed train example")
        query_data = self.query_data if queries is None else _rows_by_id(queries, np.asarray(self.queries), "query")
        return dataclasses.replace(self, train_data=train_data, query_data=query_data)

    def data_columns(self) -> tuple[str, ...]:
        """The record fields :meth:`with_data` added, in order: ``train_<column>``, then ``query_<column>``."""
        return tuple(name for name, _, _ in self._data_fields())

    def _data_fields(self) -> list[tuple[str, str, str]]:
        """(record field, "train" or "query", data column) of each data column."""
        fields: list[tuple[str, str, str]] = []
        for who, rows in (("train", self.train_data), ("query", self.query_data)):
            for col in dict.fromkeys(c for row in (rows or {}).values() for c in row):
                name = f"{who}_{col}"
                while name in RECORD_FIELDS or any(name == f for f, _, _ in fields):  # a data column named "index"
                    name += "_data"
                fields.append((name, who, col))
        return fields

    def records(self) -> list[dict[str, Any]]:
        """One dict per (query, side, rank): {query, side, rank, train_id, train_index, score}, and the
        :meth:`data_columns` when the result carries data rows."""
        fields = self._data_fields()
        out = []
        for j, q in enumerate(self.queries):
            for side in self.indices:
                for rank, (i, s) in enumerate(zip(self.indices[side][j], self.scores[side][j]), start=1):
                    train_id = str(self.train_ids[i])
                    record: dict[str, Any] = {"query": q, "side": side, "rank": rank, "train_id": train_id,
                                              "train_index": int(i), "score": float(s)}
                    for name, who, col in fields:
                        row = (self.train_data or {}).get(train_id) if who == "train" else (self.query_data or {}).get(q)
                        record[name] = (row or {}).get(col)
                    out.append(record)
        return out

    def envelope(self) -> dict[str, Any]:
        """The JSON answer: :func:`envelope` of this result's records."""
        return envelope(self.measure, self.num_columns, self.records())

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame.from_records(self.records(), columns=[*RECORD_FIELDS, *self.data_columns()])

    def write(self, path: str | os.PathLike[str] | IO[str], fmt: str | None = None) -> None:
        """Write as json (the :meth:`envelope`: measure, num_columns, records), jsonl (one record a line),
        csv or parquet (a table; a data column holding lists or objects as JSON text), to a file (the format
        defaults to its suffix) or a text stream such as ``sys.stdout``."""
        if not fmt:
            if not isinstance(path, (str, os.PathLike)):
                raise InvalidInputError("give the format when writing to a stream (json, jsonl or csv)")
            fmt = os.fspath(path).rsplit(".", 1)[-1]
        if fmt not in TABLE_FORMATS:
            raise InvalidInputError(f"unknown output format {fmt!r}; use {', '.join(TABLE_FORMATS)}")
        if fmt == "json":
            write_json(self.envelope(), path)
            return
        records = self.records()
        if fmt in ("csv", "parquet"):
            data = self.data_columns()
            records = [{k: json.dumps(v, ensure_ascii=False) if k in data and isinstance(v, (list, dict)) else v
                        for k, v in r.items()} for r in records]
        write_records(records, path, fmt, [*RECORD_FIELDS, *self.data_columns()])


def _rows_by_id(data: DataFile, ids: np.ndarray, what: str) -> dict[str, dict[str, Any]]:
    """{id: the data-file row of that id, without its id column} for each of ``ids``."""
    position = {example: i for i, example in enumerate(data.ids)}
    missing = [str(x) for x in ids if str(x) not in position]
    if missing:
        how = "its 'id' column" if data.by_id_column else "row number (it has no 'id' column)"
        raise InvalidInputError(
            f"{len(missing)} {what} id(s) are not in the data file {data.path}, matched by {how} "
            f"(first: {missing[0]!r}); give the file the store was built from"
        )
    return {str(x): {k: _plain(v) for k, v in data.rows[position[str(x)]].items() if k != ID_FIELD} for x in ids}


def _plain(value: Any) -> Any:
    """A data-file value as JSON can hold it: a NaN or infinity (a missing number) as None, a value JSON has
    no type for (a date, bytes) as its text."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (str, int, bool)) else str(value)


def resolve_sides(side: str) -> tuple[Side, ...]:
    choice = side_choice(side)
    return SIDES if choice == "both" else (choice,)


def check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
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
    if isinstance(queries, (str, bytes)) or not (hasattr(queries, "__len__") and hasattr(queries, "__iter__")):
        raise InvalidInputError(
            f"queries must be a list of query ids (e.g. ['q17']), not {type(queries).__name__} {queries!r}"
        )
    if len(queries) == 0:
        raise InvalidInputError("no query ids given; omit them to score the whole query set")
    rows = store.query_index(query_set, queries)
    return rows, tuple(str(q) for q in queries)


@dataclasses.dataclass(frozen=True)
class ScoringRequest:
    """A validated query-scoring request: the snapshot, the query rows and names, the columns (slots)
    and the prepared measure. Shared by topk, influence, scores and stability."""

    sides: tuple[str, ...]
    snapshot: Snapshot
    rows: np.ndarray
    names: tuple[str, ...]
    slots: list[int]
    positions: np.ndarray | None
    losses: np.ndarray  # (m, K') query losses over the chosen columns
    measure: Measure
    gram: Gram | None

    @property
    def num_columns(self) -> int:
        return int(self.losses.shape[1])

    def prepared(self, positions: np.ndarray | None = None) -> Prepared:
        """The measure prepared for these queries, on the request's columns or a selection of them."""
        if positions is None:
            return prepare(self.measure, self.losses, self.gram, self.positions)
        chosen = positions if self.positions is None else self.positions[positions]
        return prepare(self.measure, self.losses[:, positions], self.gram, chosen)

    def blocks(self, store: LossStore, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Train row blocks over the request's columns (positions applied), ``block_rows`` high (None:
        :func:`scan_block_rows`)."""
        rows = store.rows(self.snapshot, self.slots)
        for offset, block in rows.blocks(scan_block_rows(rows, block_rows)):
            yield offset, block if self.positions is None else np.ascontiguousarray(block[:, self.positions])


def _positions(columns: Sequence[int] | None, num: int, query_set: str | None) -> np.ndarray | None:
    if columns is None:
        return None
    given = None if isinstance(columns, (str, bytes)) or not hasattr(columns, "__iter__") else list(columns)
    if given is None or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in given):
        raise InvalidInputError(f"columns must be a list of integer column positions 0..K-1, not {columns!r}")
    pos = np.asarray(given, dtype=np.int64)
    if pos.ndim != 1 or len(pos) == 0:
        raise InvalidInputError("columns must be a non-empty list of column positions 0..K-1")
    bad = pos[(pos < 0) | (pos >= num)]
    if len(bad):
        where = f" with losses for query set {query_set!r}" if query_set else ""
        raise InvalidInputError(
            f"column position {int(bad[0])} is out of range: the snapshot has K={num} committed columns{where} "
            f"(positions 0..{num - 1}); see `daunce status`"
        )
    return pos


def _check_snapshot_and_blocks(snapshot: object, block_rows: object) -> None:
    from daunce_store.store import Snapshot

    if snapshot is not None and not isinstance(snapshot, Snapshot):
        raise InvalidInputError(f"snapshot must be a Snapshot (from store.snapshot()) or None, not {type(snapshot).__name__}")
    if block_rows is not None and (not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1):
        raise InvalidInputError(f"block_rows must be a whole number >= 1 (or None: the store's chunk rows), not {block_rows!r}")


def measure_plan(
    store: LossStore, measure: str, snapshot: Snapshot | None, query_set: str | None,
    columns: Sequence[int] | None = None, block_rows: int | None = None,
) -> tuple[Snapshot, list[int], np.ndarray | None, Measure]:
    """Snapshot, slots, positions and the resolved measure of a request on the columns of ``query_set``
    (every committed column when None), all checked; no scan yet."""
    _check_snapshot_and_blocks(snapshot, block_rows)
    snap = snapshot or store.snapshot()
    slots = store.committed_slots(snapshot=snap, query_set=query_set)
    positions = _positions(columns, len(slots), query_set)
    _check_columns(len(slots) if positions is None else len(positions), query_set)
    return snap, slots, positions, resolve_measure(measure, snap, slots)


def measure_inputs(
    store: LossStore, measure: str, snapshot: Snapshot | None, query_set: str | None,
    columns: Sequence[int] | None = None, block_rows: int | None = None,
) -> tuple[Snapshot, list[int], np.ndarray | None, Measure, Gram | None]:
    """:func:`measure_plan` and the measure's Gram (one pass, cached)."""
    snap, slots, positions, resolved = measure_plan(store, measure, snapshot, query_set, columns, block_rows)
    gram = gram_for(store, snap, slots, resolved.preconditioner, block_rows) if resolved.preconditioner else None
    return snap, slots, positions, resolved, gram


def check_query_request(
    store: LossStore, query_set: str, queries: Sequence[str] | None, k: int | None, measure: str, side: str,
) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """The checks of a query-scoring request that read nothing but the query ids: its sides, query rows
    and names."""
    if not isinstance(query_set, str):
        raise InvalidInputError(f"query_set must be a query-set name (a string), not {type(query_set).__name__} {query_set!r}")
    resolve_measure(measure)  # a bad name fails here, before any reading
    sides = resolve_sides(side)
    if k is not None:
        check_k(k, store.n_train)
    rows, names = _query_rows(store, query_set, queries)
    return sides, rows, names


def scoring_request(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None,
    k: int | None,
    measure: str,
    side: str,
    snapshot: Snapshot | None,
    columns: Sequence[int] | None = None,
    block_rows: int | None = None,
) -> ScoringRequest:
    """Validate a query-scoring request and load its queries (``k`` None: no top-k, dense scores)."""
    sides, rows, names = check_query_request(store, query_set, queries, k, measure, side)
    snap = snapshot or store.snapshot()
    snap, slots, positions, resolved, gram = measure_inputs(store, measure, snap, query_set, columns, block_rows)
    q = store.query_losses(query_set, snapshot=snap)[rows]
    if positions is not None:
        q = q[:, positions]
    _warn_constant_queries(q, names)
    return ScoringRequest(sides, snap, rows, names, slots, positions, np.ascontiguousarray(q), resolved, gram)


def _warn_constant_queries(losses: np.ndarray, names: tuple[str, ...]) -> None:
    """A query whose loss is the same under every perturbation has no covariance with anything: its scores
    are all 0 and its top-k lists are ties in row order, not attributions. Say so."""
    constant = np.flatnonzero(np.ptp(losses, axis=1) == 0)
    if len(constant):
        shown = ", ".join(repr(names[i]) for i in constant[:5]) + (" ..." if len(constant) > 5 else "")
        warnings.warn(
            f"{len(constant)} quer{'y has' if len(constant) == 1 else 'ies have'} the same loss under all "
            f"K={losses.shape[1]} perturbations ({shown}): every score is 0 and the top-k lists are ties in row "
            "order, not attributions. Check how those query losses were computed (a masked or saturated "
            "target gives a constant loss)",
            ConstantQueryWarning,
            stacklevel=4,
        )


def check_aggregate(aggregate: str | None) -> None:
    if aggregate not in (None, "mean"):
        raise InvalidInputError(f"aggregate must be None or 'mean', not {aggregate!r}")


def kernel_queries(req: ScoringRequest, prep: Prepared, query_set: str, queries: Sequence[str] | None,
                   aggregate: str | None) -> tuple[np.ndarray, bool, tuple[str, ...]]:
    """The query rows a kernel scores, whether they are prepared already, and their names: one row per
    query, or (``aggregate="mean"``) their mean, which is exact because scores are linear in the prepared
    query rows."""
    check_aggregate(aggregate)
    if aggregate is None:
        return (*prep.kernel_queries, req.names)
    name = f"{query_set}:mean" if queries is None else f"{query_set}:mean-of-{len(req.rows)}"
    return prep.queries.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :], True, (name,)


def topk_store(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "both",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    columns: Sequence[int] | None = None,
    block_rows: int | None = None,
    aggregate: str | None = None,
    client: Client | str | None = None,
    partition_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attribution:
    """Top-k proponents/opponents among train examples for each query of ``query_set``; with
    ``aggregate="mean"``, for their mean score over the queries (see :func:`influence`).

    ``measure``: see :data:`daunce_store.scoring.MEASURES` (``auto``: nystrom when every column records
    its draw, else whitened). ``columns``: positions 0..K-1 of the snapshot's columns for this query set
    (default: all). ``client``: score on that Dask cluster (a ``distributed.Client`` or a scheduler address),
    with the same answer, one task per partition of about ``partition_rows`` rows, each opening the store's
    URL with ``storage_options`` (see :func:`~daunce_store.scoring._distributed.executor`).
    """
    check_aggregate(aggregate)  # before any reading
    # The request's checks before the Gram pass (which may run on a cluster), so bad input fails before any scan.
    check_query_request(store, query_set, queries, k, measure, side)
    snap, slots, _, resolved = measure_plan(store, measure, snapshot, query_set, columns, block_rows)
    with executor(store, snap, slots, block_rows, client=client, partition_rows=partition_rows,
                  storage_options=storage_options) as ex:
        ex.gram(resolved.preconditioner)  # where scoring_request finds it: the handle's cache
        req = scoring_request(store, query_set, queries, k, measure, side, snap, columns, block_rows)
        return _topk_request(store, ex, req, query_set, queries, k, backend, block_rows, aggregate)


def _topk_request(store: LossStore, ex: Executor, req: ScoringRequest, query_set: str, queries: Sequence[str] | None,
                  k: int, backend: str, block_rows: int | None, aggregate: str | None) -> Attribution:
    prep = req.prepared()
    if (prep.transform is not None and req.positions is None and req.gram is not None
            and accumulator_class(backend).takes_row_scales):
        # Persisted (or, in this process, just written): cov's cost, no K × K product per row.
        scales = stored_row_scales(store, req.snapshot, req.slots, req.gram, block_rows, compute=ex.local)
        if scales is not None:
            prep = prep.scaled(scales)
    q, prepared, names = kernel_queries(req, prep, query_set, queries, aggregate)
    task = TopKTask(prep, q, prepared, int(k), req.sides, backend, req.positions, block_rows)
    # On the merged answer, with the measure's kernel, not the prepared one: scaled rows rank correlations,
    # which cannot underflow; and a partition's rows may all score 0 where others do not.
    result = check_underflow(ex.topk(scan_topk, task, int(k)), q, prepared, req.measure.kernel, names, req.measure.name)
    return Attribution.from_result(names, store.train_ids_at, result, req.measure.name, req.num_columns)


def topk_losses(
    store: LossStore,
    losses: np.ndarray,
    names: Sequence[str],
    slots: Sequence[int],
    *,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "both",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
) -> Attribution:
    """Top-k train examples for queries that are not in the store: ``losses`` (m, len(slots)) are their losses
    under the committed columns ``slots`` (e.g. new examples evaluated under the kept adapters), scored against
    the train rows of those columns exactly as a stored query set's would be."""
    sides = resolve_sides(side)
    resolve_measure(measure)
    check_k(k, store.n_train)
    q = np.asarray(losses)
    if q.ndim != 2 or q.shape != (len(names), len(slots)):
        raise InvalidInputError(f"losses must be (queries, columns) = ({len(names)}, {len(slots)}), not {q.shape}")
    snap = snapshot or store.snapshot()
    committed = store.committed_slots(snapshot=snap)
    where = {slot: i for i, slot in enumerate(committed)}
    if any(int(s) not in where for s in slots):
        raise InvalidInputError(f"slot {next(int(s) for s in slots if int(s) not in where)} is not a committed column of {store.url}")
    order = np.argsort([where[int(s)] for s in slots], kind="stable")  # the request's columns run in slot order
    positions = [where[int(slots[i])] for i in order]
    snap, chosen, pos, resolved, gram = measure_inputs(store, measure, snap, None, None if len(positions) == len(committed) else positions, block_rows)
    q = np.ascontiguousarray(q[:, order], dtype=np.float32)
    validate_losses(q.ravel(), q.size, what="the new queries' losses")
    names = tuple(str(n) for n in names)
    _warn_constant_queries(q, names)
    req = ScoringRequest(sides, snap, np.arange(len(names)), names, chosen, pos, q, resolved, gram)
    ex = LocalExecutor(store, store.rows(snap, chosen), block_rows)
    return _topk_request(store, ex, req, "new", None, k, backend, block_rows, None)


def influence(store: LossStore, query_set: str, queries: Sequence[str] | None = None, **options: Any) -> Attribution:
    """Aggregate influence of each train example on a whole query set: the mean of its scores over the
    queries, top-k per side (the options of :func:`topk_store`)."""
    return topk_store(store, query_set, queries, aggregate="mean", **options)


def check_self_influence(store: LossStore, k: int, measure: str, side: str) -> tuple[str, ...]:
    """The checks of a self-influence request; its sides."""
    sides = resolve_sides(side)
    check_k(k, store.n_train)
    if resolve_measure(measure).normalized:  # by name: auto-corr is normalised whatever it resolves to
        raise InvalidInputError(
            f"self-influence under {measure!r} is 1 for every example (that measure divides by the self-score); "
            "use cov, whitened or nystrom"
        )
    return sides


def self_influence(
    store: LossStore,
    *,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "pos",
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
    client: Client | str | None = None,
    partition_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attribution:
    """Self-influence of each train example, top-k largest (``pos``: likely mislabeled or outliers)
    and/or smallest (``neg``): var_k(L_i) = cov(i, i) for ``cov``, ū_iᵀ M ū_i for ``whitened`` and
    ``nystrom`` (``auto``: nystrom when every column records its draw). Same streaming selection as
    :func:`topk_store`, on the same executors (``client``, ``partition_rows``, ``storage_options``)."""
    sides = check_self_influence(store, k, measure, side)
    snap, slots, _, resolved = measure_plan(store, measure, snapshot, None, None, block_rows)
    with executor(store, snap, slots, block_rows, client=client, partition_rows=partition_rows,
                  storage_options=storage_options) as ex:
        gram = ex.gram(resolved.preconditioner)
        metric = None if gram is None else gram.preconditioner()
        best = ex.topk(scan_self, SelfTask(metric, int(k), sides, backend, block_rows), int(k))
    name = "var" if resolved.name == "cov" else resolved.name
    return Attribution.from_result(("<self>",), store.train_ids_at, best, name, len(slots))


@dataclasses.dataclass(frozen=True)
class Scores:
    """Dense scores of every train example for each query (or their mean over the query set), computed
    block by block: iterate for ``(row_offset, (R, m) float32)`` blocks, or gather with :meth:`to_numpy`
    / :meth:`to_pandas` (n × m in memory: for evaluation and moderate n).

    ``scores[i, j]`` is the value :meth:`LossStore.topk` ranks (positive: proponent).
    """

    queries: tuple[str, ...]
    train_ids: np.ndarray
    measure: str
    num_columns: int
    _request: ScoringRequest
    _prepared: Prepared
    _store: Any
    _block_rows: int | None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        cov = self._prepared.kernel == "cov"
        top = np.zeros(len(self.queries), np.float32)  # each query's largest |score| so far (cov)
        for offset, block in self._request.blocks(self._store, self._block_rows):
            with np.errstate(over="ignore", invalid="ignore"):  # reported below, by query
                scores = self._prepared.dense(block).astype(np.float32)
            bad = ~np.isfinite(scores)
            if bad.any():  # as the top-k kernels: no inf or NaN score is ever handed out (or written)
                raise score_overflow_error(int(np.flatnonzero(bad.any(axis=0))[0]))
            if cov and len(scores):
                top = np.maximum(top, np.maximum(scores.max(axis=0), -scores.min(axis=0)))
            yield offset, scores
        if cov and not (top >= _TINY).all():  # as the top-k paths (check_underflow): all-underflowed is no answer
            raw = self._request.losses  # the losses themselves, unless these are their mean (aggregate)
            same = raw.shape[0] == len(self.queries)
            spread = query_spread(raw, False) if same else query_spread(self._prepared.queries, True)
            bad_queries = np.flatnonzero(underflowed(top, spread))
            if len(bad_queries):
                j = int(bad_queries[0])
                raise score_underflow_error(f"query {self.queries[j]!r}", float(spread[j]), self.measure)

    def to_numpy(self) -> np.ndarray:
        out = np.empty((len(self.train_ids), len(self.queries)), np.float32)
        for offset, block in self:
            out[offset : offset + len(block)] = block
        return out

    def to_pandas(self) -> pd.DataFrame:
        """One row per train example (index: train id), one column per query."""
        import pandas as pd

        return pd.DataFrame(self.to_numpy(), index=pd.Index(self.train_ids, name="train_id"), columns=list(self.queries))

    def write(self, path: str | os.PathLike[str], fmt: str | None = None) -> int:
        """Write a table with a ``train_id`` column and one column per query, one row block at a time
        (parquet, csv or jsonl stream; json gathers), so n × m never sits in memory; returns the rows."""
        import pandas as pd

        fmt = fmt or os.fspath(path).rsplit(".", 1)[-1]
        if fmt not in TABLE_FORMATS:
            raise InvalidInputError(f"unknown output format {fmt!r}; use {', '.join(TABLE_FORMATS)}")
        if "train_id" in self.queries:
            raise InvalidInputError("a query is named 'train_id', which is the key column of the table; rename it")

        def frames() -> Iterator[pd.DataFrame]:
            for offset, block in self:
                frame = pd.DataFrame(block, columns=list(self.queries))
                frame.insert(0, "train_id", self.train_ids[offset : offset + len(block)].astype(object))
                yield frame

        return write_frames(frames(), path, fmt)


def scores(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    measure: str = DEFAULT_MEASURE,
    aggregate: str | None = None,
    snapshot: Snapshot | None = None,
    columns: Sequence[int] | None = None,
    block_rows: int | None = None,
) -> Scores:
    """Dense scores under ``measure`` of every train example for each query of ``query_set``;
    ``aggregate="mean"``: one column, the mean over the queries (what :func:`influence` ranks).

    >>> store.scores("test", measure="nystrom").to_numpy().shape       # doctest: +SKIP
    (1437, 360)
    """
    check_aggregate(aggregate)
    req = scoring_request(store, query_set, queries, None, measure, "both", snapshot, columns, block_rows)
    prep = req.prepared()
    names = req.names
    if aggregate == "mean":
        prep = dataclasses.replace(prep, queries=prep.queries.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :])
        names = (f"{query_set}:mean",)
    return Scores(names, store.train_ids, req.measure.name, req.num_columns, req, prep, store, block_rows)
