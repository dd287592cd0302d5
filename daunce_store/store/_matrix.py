"""Many black-box columns at once: a loss matrix (one column per perturbation) read, joined on example
ids, checked whole, then appended column by column.

Layouts (``read_loss_matrix``):

- a table (``.parquet``, ``.csv``, a pandas DataFrame or a pyarrow Table): columns ``set`` (optional;
  ``train`` or a query-set name, default ``train``), ``id``, then one float column per perturbation id
  (the column's name is the id). Rows are joined on ``(set, id)``, so their order does not matter.
- ``.npz`` (or a mapping of arrays): ``ids`` (train ids, strings), ``perturbations`` (strings), ``train``
  (n × P) and, per query set, ``query_ids__<set>`` and ``query__<set>`` (m × P).

Why everything is checked before the first append: a matrix is one user action, and a bad cell found at
column 40 of 64 would leave 39 columns committed that the user then has to skip by hand. What cannot be
checked beforehand (a concurrent writer committing the same id) fails one ``append``; the columns
committed before it stay (each is a valid, complete column) and the error names both lists.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store import _constants as C
from daunce_store.errors import (
    AlreadyCommittedError,
    CapacityError,
    DaunceStoreError,
    DivergedError,
    InvalidInputError,
    MissingQueryLossesWarning,
)
from daunce_store.store._inputs import (
    DIVERGED_ADVICE,
    _check_file,
    _first_line,
    json_mapping,
    out_of_range,
    out_of_range_summary,
    read_table,
    validate_ids,
)
from daunce_store.store._records import Commit, check_perturbation_id
from daunce_store.store._shape import StoreShape

__all__ = ["LossMatrix", "read_loss_matrix", "append_matrix", "append_query_matrix", "warn_missing_query_losses"]

TRAIN = "train"
_SET, _ID = "set", "id"
_NPZ_QUERY_IDS, _NPZ_QUERY = "query_ids__", "query__"
_SHOWN = 5  # how many ids or perturbations an error names


class LossMatrix:
    """Perturbation ids (canonical, in file order) and, per set (``train`` or a query set), the example
    ids and their (rows × P) losses, rows in file order."""

    def __init__(self, source: str, perturbations: list[str], blocks: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.source, self.perturbations, self.blocks = source, perturbations, blocks

    def aligned(self, name: str, store_ids: np.ndarray, what: str) -> np.ndarray:
        """Set ``name``'s losses as float32 (len(store_ids) × P), rows in the store's order; an error names
        missing and extra ids, and the first NaN/inf cells by id and perturbation."""
        ids, values = self.blocks[name]
        position = {s: i for i, s in enumerate(ids.tolist())}
        wanted = store_ids.tolist()
        missing = [s for s in wanted if s not in position]
        known = set(wanted)
        extra = [s for s in ids.tolist() if s not in known]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of the {what}'s {len(wanted)} ids are missing (e.g. {_few(missing)})")
            if extra:
                parts.append(f"{len(extra)} ids are not in the {what} (e.g. {_few(extra)})")
            raise InvalidInputError(
                f"{self.source}: {'; '.join(parts)}; give exactly one row per {what} id (`daunce status` shows the sets)"
            )
        order = np.fromiter((position[s] for s in wanted), dtype=np.int64, count=len(wanted))
        values = values[order]
        bad = out_of_range(values)  # validate_losses' rule, checked for every column before the first append
        if bad.any():
            rows, cols = np.nonzero(bad)
            cells = [f"{wanted[r]!r} under {self.perturbations[c]!r}" for r, c in zip(rows[:_SHOWN].tolist(), cols[:_SHOWN].tolist())]
            perturbations = [self.perturbations[c] for c in np.unique(cols)[:_SHOWN].tolist()]
            raise DivergedError(
                f"{self.source}: {what} {out_of_range_summary(values[bad])} (e.g. {', '.join(cells)}) in perturbations "
                f"{_few(perturbations)}; {DIVERGED_ADVICE} (or fill the empty cells)"
            )
        return np.ascontiguousarray(values.astype(np.float32))


def _few(items: Sequence[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:_SHOWN])
    return shown + (", ..." if len(items) > _SHOWN else "")


def _perturbation_ids(names: Iterable[object], source: str) -> list[str]:
    """Column names as canonical perturbation ids; two spellings of one id (``3`` and ``03``) are an error."""
    out: list[str] = []
    seen: dict[str, object] = {}
    for name in names:
        pid = check_perturbation_id(name)
        if pid in seen:
            raise InvalidInputError(f"{source}: columns {seen[pid]!r} and {name!r} are both perturbation {pid!r}; keep one")
        seen[pid] = name
        out.append(pid)
    if not out:
        raise InvalidInputError(f"{source}: no perturbation columns; after `id` (and `set`) give one loss column per perturbation id")
    return out


def read_loss_matrix(table_or_path: Any, *, default_set: str = TRAIN) -> LossMatrix:
    """A loss matrix from a path (``.parquet``, ``.csv``, ``.npz``), a DataFrame, a pyarrow Table or a
    mapping of arrays (the ``.npz`` layout). Table rows without a ``set`` column belong to ``default_set``."""
    if isinstance(table_or_path, (str, os.PathLike)):
        path = Path(table_or_path)
        _check_file(path, "loss matrix")
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {key: npz[key] for key in npz.files}
            except (ValueError, OSError, EOFError) as e:  # object arrays need pickle: refused, named
                raise InvalidInputError(f"{path} is not a readable .npz of plain arrays ({_first_line(e)}); save it with numpy.savez") from None
            return _from_arrays(arrays, str(path))
        if path.suffix not in (".parquet", ".csv"):
            raise InvalidInputError(f"loss matrix {path}: use .parquet, .csv or .npz")
        return _from_frame(read_table(path, as_text=True, layout="a header `id,<perturbation>,...` and one row per example"), str(path), default_set)
    if isinstance(table_or_path, Mapping):
        return _from_arrays(dict(table_or_path), "the loss matrix")
    if hasattr(table_or_path, "to_pandas") and not hasattr(table_or_path, "iloc"):  # a pyarrow Table
        table_or_path = table_or_path.to_pandas()
    if hasattr(table_or_path, "iloc") and hasattr(table_or_path, "columns"):
        return _from_frame(table_or_path, "the loss matrix", default_set)
    raise InvalidInputError(
        f"a loss matrix is a path (.parquet, .csv, .npz), a DataFrame, a pyarrow Table or a dict of arrays, not {type(table_or_path).__name__}"
    )


def _text(values: Any) -> np.ndarray:
    """A column of ids or set names as strings (parquet integer ids: the strings a text file gives)."""
    arr = values.to_numpy()
    if arr.dtype.kind in "iu":
        return arr.astype(str).astype(object)
    return arr


def _from_frame(frame: Any, source: str, default_set: str) -> LossMatrix:
    import pandas as pd

    names = [str(c) for c in frame.columns]
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise InvalidInputError(f"{source}: columns {dupes} appear twice; one column per perturbation id")
    if _ID not in names:
        raise InvalidInputError(f"{source} has no `id` column (it has {names[:8]}); give `set` (optional), `id`, then one column per perturbation id")
    if len(frame) == 0:
        raise InvalidInputError(f"{source} has a header but no rows; write one row per example")
    frame = frame.set_axis(names, axis=1)
    loss_columns = [c for c in names if c not in (_SET, _ID)]
    perturbations = _perturbation_ids(loss_columns, source)
    values = np.empty((len(frame), len(loss_columns)), dtype=np.float64)
    for j, column in enumerate(loss_columns):
        col = frame[column]
        if col.dtype.kind in "fiu":
            values[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        numbers = pd.to_numeric(col, errors="coerce")
        text = col.astype(str).str.strip().str.lower()
        blank = col.isna() | text.isin(("", "nan", "na", "n/a", "null", "none"))
        bad = np.flatnonzero(numbers.isna().to_numpy() & ~blank.to_numpy())
        if len(bad):
            raise InvalidInputError(
                f"{source}: column {column!r}, row {int(bad[0])} holds {col.iloc[bad[0]]!r}, not a number; losses must be numbers"
            )
        values[:, j] = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    ids = _text(frame[_ID])
    sets = _text(frame[_SET]) if _SET in names else np.full(len(frame), default_set, dtype=object)
    blank_set = [i for i, s in enumerate(sets.tolist()) if not isinstance(s, str) or not s.strip()]
    if blank_set:
        raise InvalidInputError(f"{source}: row {blank_set[0]} has no `set`; write `train` or a query-set name")
    blocks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in dict.fromkeys(sets.tolist()):  # first-seen order
        rows = np.flatnonzero(sets == name)
        blocks[str(name)] = (validate_ids(ids[rows], what=f"{source}, set {name!r}"), values[rows])
    return LossMatrix(source, perturbations, blocks)


def _from_arrays(arrays: dict[str, Any], source: str) -> LossMatrix:
    layout = f"arrays `ids`, `perturbations`, `train` (n × P) and optional `{_NPZ_QUERY_IDS}<set>` / `{_NPZ_QUERY}<set>` (m × P)"
    queries = {k[len(_NPZ_QUERY):] for k in arrays if k.startswith(_NPZ_QUERY)}
    query_ids = {k[len(_NPZ_QUERY_IDS):] for k in arrays if k.startswith(_NPZ_QUERY_IDS)}
    unknown = sorted(k for k in arrays if k not in ("ids", "perturbations", TRAIN) and not k.startswith((_NPZ_QUERY, _NPZ_QUERY_IDS)))
    if unknown:
        raise InvalidInputError(f"{source}: unexpected arrays {unknown}; the layout is {layout}")
    if queries != query_ids:
        lone = sorted(queries ^ query_ids)
        raise InvalidInputError(f"{source}: query sets {lone} have ids or losses but not both; give `{_NPZ_QUERY_IDS}<set>` and `{_NPZ_QUERY}<set>` together")
    if "perturbations" not in arrays:
        raise InvalidInputError(f"{source}: no `perturbations` array; the layout is {layout}")
    if ("ids" in arrays) != (TRAIN in arrays):
        raise InvalidInputError(f"{source}: give `ids` and `train` together; the layout is {layout}")
    pids = np.asarray(arrays["perturbations"])
    if pids.ndim != 1 or pids.dtype.kind not in "UiuO":
        raise InvalidInputError(f"{source}: `perturbations` must be a 1-d array of ids (strings), not {pids.dtype} of shape {pids.shape}")
    perturbations = _perturbation_ids(pids.tolist(), source)
    blocks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pairs = ([(TRAIN, "ids", TRAIN)] if "ids" in arrays else []) + [(q, _NPZ_QUERY_IDS + q, _NPZ_QUERY + q) for q in sorted(queries)]
    for name, ids_key, values_key in pairs:
        ids = validate_ids(arrays[ids_key], what=f"{source}, array {ids_key!r}")
        values = np.asarray(arrays[values_key])
        if values.dtype.kind not in "fiu":
            raise InvalidInputError(f"{source}: array {values_key!r} holds {values.dtype}, not numbers; losses must be numbers")
        if values.ndim == 1 and len(perturbations) == 1:
            values = values[:, None]
        if values.shape != (len(ids), len(perturbations)):
            raise InvalidInputError(
                f"{source}: array {values_key!r} has shape {values.shape}, expected ({len(ids)}, {len(perturbations)}): "
                f"one row per id in {ids_key!r}, one column per perturbation"
            )
        blocks[name] = (ids, values)
    if not blocks:
        raise InvalidInputError(f"{source}: no losses; the layout is {layout}")
    return LossMatrix(source, perturbations, blocks)


def warn_missing_query_losses(store: StoreShape, perturbations: Sequence[str], given: Iterable[str], stacklevel: int = 3) -> None:
    """A MissingQueryLossesWarning when columns were appended without losses for some of the store's query
    sets (they cannot be scored against those sets until ``daunce append-queries`` fills them)."""
    missing = sorted(set(store.query_sets()) - set(given))
    if not missing or not perturbations:
        return
    what = f"perturbation {perturbations[0]!r}" if len(perturbations) == 1 else f"{len(perturbations)} perturbations ({_few(list(perturbations))})"
    warnings.warn(
        f"{what} committed without losses for query set(s) {missing}: scoring those sets leaves this column out; add "
        f"them later with `daunce append-queries {store.url} --query-set NAME --matrix FILE` (or LossStore.append_query_losses; for runs of `daunce perturb` with kept adapters: `daunce add-queries --config`)",
        MissingQueryLossesWarning,
        stacklevel=stacklevel,
    )


def _partial_failure(error: DaunceStoreError, done: list[str], rest: list[str], action: str) -> DaunceStoreError:
    """``error`` (same class) saying which columns were already written and which were not."""
    message = (
        f"{error} -- {action} stopped at {rest[0]!r}: {len(done)} committed and kept ({_few(done) or 'none'}); "
        f"{len(rest)} not committed ({_few(rest)}); fix the cause and run it again with only the columns not committed"
    )
    try:
        out = type(error)(message)
    except TypeError:
        out = DaunceStoreError(message)
    out.committed = list(done)
    out.not_committed = list(rest)
    return out


def append_matrix(store: StoreShape, table_or_path: Any, *, metadata: Mapping[str, Any] | None = None) -> list[Commit]:
    """Append one column per perturbation of a loss matrix (layouts: module docstring); see
    :meth:`LossStore.append_matrix`."""

    store._require_writable()
    metadata = json_mapping(metadata, "metadata")
    matrix = read_loss_matrix(table_or_path)
    if TRAIN not in matrix.blocks:
        raise InvalidInputError(f"{matrix.source}: no train rows; every perturbation needs its train losses (rows with set `train`)")
    known = store.query_sets()
    unknown = [name for name in matrix.blocks if name != TRAIN and name not in known]
    if unknown:
        raise InvalidInputError(
            f"{matrix.source}: set(s) {unknown} are neither `train` nor a query set of {store.url} (it has: {', '.join(known) or 'none'})"
        )
    train = matrix.aligned(TRAIN, store.train_ids, "train set")
    queries = {name: matrix.aligned(name, store.query_ids(name), f"query set {name!r}") for name in matrix.blocks if name != TRAIN}
    committed = store._committed_ids()
    already = [p for p in matrix.perturbations if p in committed]
    if already:
        raise AlreadyCommittedError(
            f"{matrix.source}: {len(already)} perturbation(s) are already committed in {store.url} ({_few(already)}); "
            "nothing was appended; drop those columns (appends are idempotent per id) or use new ids"
        )
    taken = store._storage.list(C.SLOTS_PREFIX)
    free = store.capacity - (max((int(k.rsplit("/", 1)[1].split(".")[0]) for k in taken), default=-1) + 1)
    if len(matrix.perturbations) > free:
        raise CapacityError(
            f"{store.url} has {free} free column slots, the matrix has {len(matrix.perturbations)} columns; nothing was appended"
        )
    meta = {"source": "append-matrix", **metadata}
    commits: list[Commit] = []
    with warnings.catch_warnings():  # one warning for the whole matrix, below, not one per column
        warnings.simplefilter("ignore", MissingQueryLossesWarning)
        for j, pid in enumerate(matrix.perturbations):
            try:
                commits.append(store.append(pid, train[:, j], {q: v[:, j] for q, v in queries.items()}, metadata=meta))
            except DaunceStoreError as e:
                raise _partial_failure(e, [c.perturbation for c in commits], matrix.perturbations[j:], "append --matrix") from e
    warn_missing_query_losses(store, matrix.perturbations, queries, stacklevel=4)
    return commits


def append_query_matrix(store: StoreShape, name: str, table_or_path: Any) -> list[str]:
    """Fill query set ``name``'s losses of already committed columns from a matrix (``id`` + one column per
    committed perturbation; rows joined on ids), one :meth:`LossStore.append_query_losses` per column;
    returns the perturbation ids filled. Every column is checked (committed, no losses for ``name`` yet,
    ids, NaN/inf) before the first is written.

    Examples
    --------
    >>> import numpy as np, pandas as pd, daunce_store, tempfile
    >>> from daunce_store.store import append_query_matrix
    >>> store = daunce_store.init(tempfile.mkdtemp() + "/s.zarr", ["a", "b"])
    >>> _ = store.append_matrix(pd.DataFrame({"id": ["b", "a"], "p0": [0.2, 0.1], "p1": [0.3, 0.4]}))
    >>> store.add_query_set("late", ["q"])
    >>> append_query_matrix(store, "late", pd.DataFrame({"id": ["q"], "p0": [1.0], "p1": [2.0]}))
    ['p0', 'p1']
    """
    store._require_writable()
    store_ids = store.query_ids(name)  # UnknownQuerySetError for an unknown set
    matrix = read_loss_matrix(table_or_path, default_set=name)
    other = [s for s in matrix.blocks if s != name]
    if other:
        raise InvalidInputError(f"{matrix.source}: rows of set(s) {other}; append-queries fills query set {name!r} only")
    values = matrix.aligned(name, store_ids, f"query set {name!r}")
    snapshot = store.snapshot()
    slot_of = {c.perturbation: c.slot for c in snapshot.commits}
    uncommitted = [p for p in matrix.perturbations if p not in slot_of]
    if uncommitted:
        raise InvalidInputError(
            f"{matrix.source}: {len(uncommitted)} perturbation(s) are not committed in {store.url} ({_few(uncommitted)}); "
            "nothing was written; append their train losses first (`daunce append`)"
        )
    filled = set(snapshot.query_slots.get(name, ()))
    has = [p for p in matrix.perturbations if slot_of[p] in filled]
    if has:
        raise AlreadyCommittedError(
            f"{matrix.source}: query set {name!r} already has losses for {len(has)} perturbation(s) ({_few(has)}); "
            "nothing was written; drop those columns"
        )
    done: list[str] = []
    for j, pid in enumerate(matrix.perturbations):
        try:
            store.append_query_losses(pid, name, values[:, j])
        except DaunceStoreError as e:
            raise _partial_failure(e, done, matrix.perturbations[j:], "append-queries") from e
        done.append(pid)
    return done
