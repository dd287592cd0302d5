"""Selection: drop the training examples with the largest aggregate influence on a query set, and write the
rest (or the dropped ones) in the data file's own format.

Sign convention (the package's, DESIGN §1): a positive score makes train example i a *proponent* of the
query set: training on i lowers the queries' loss. So

* ``remove="helpful"`` drops the top-N **proponents** (``influence(side="pos")``): removing them should
  *raise* the query loss;
* ``remove="harmful"`` drops the top-N **opponents** (``influence(side="neg")``, most negative first):
  removing them should *lower* the query loss.

The ranking is exactly ``store.influence(query_set, k=N, side=...)`` (the mean score over the queries;
ties to the lower row). Rows of the data file are matched to the store's train ids by an ``id`` column
when the file has one, else by row number (row r is id ``"r"``, the string ``daunce init`` stores for a
text ids file holding 0..n-1). The file must hold exactly the store's train ids, in any order.

Formats: ``.jsonl`` (lines copied byte for byte), ``.json`` (an array of objects), ``.csv`` (cells kept as
the text the file holds) and ``.parquet`` (rows taken with pyarrow, schema kept). Kept rows are written in
the file's order; removed rows in rank order (the most influential first). The ids of the written rows,
in the same order, go to a sidecar text file, one per line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring import DEFAULT_MEASURE

if TYPE_CHECKING:
    import pandas as pd

    from daunce_store._api import Store

__all__ = ["REMOVE", "WRITE", "DATA_FORMATS", "Selection", "select", "read_data_file", "check_output"]

#: What to remove, and the influence side it is ranked on.
REMOVE = {"helpful": "pos", "harmful": "neg"}
#: Which rows to write.
WRITE = ("kept", "removed")
#: Data file formats, by suffix.
DATA_FORMATS = ("jsonl", "json", "csv", "parquet")


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file read for selection: its format, the id of each row, and the rows themselves (raw lines
    for jsonl, records for json, a text frame for csv, a pyarrow table for parquet)."""

    path: Path
    fmt: str
    ids: np.ndarray  # str, one per row
    rows: Any
    by_id_column: bool

    def take(self, positions: np.ndarray) -> Any:
        if self.fmt == "jsonl":
            return [self.rows[i] for i in positions]
        if self.fmt == "json":
            return [self.rows[i] for i in positions]
        if self.fmt == "csv":
            return self.rows.iloc[positions]
        return self.rows.take(positions)

    def frame(self, selected: Any) -> pd.DataFrame:
        import pandas as pd

        if self.fmt == "jsonl":
            return pd.DataFrame.from_records([json.loads(line) for line in selected])
        if self.fmt == "json":
            return pd.DataFrame.from_records(selected)
        if self.fmt == "csv":
            return selected.reset_index(drop=True)
        return selected.to_pandas()

    def write(self, selected: Any, path: Path) -> None:
        """Write ``selected`` rows in this file's format under a temporary name, then rename."""
        tmp = path.with_name(path.name + ".partial")
        try:
            if self.fmt == "jsonl":
                with open(tmp, "wb") as f:
                    f.writelines(line if line.endswith(b"\n") else line + b"\n" for line in selected)
            elif self.fmt == "json":
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(selected, f, ensure_ascii=False, indent=1)
                    f.write("\n")
            elif self.fmt == "csv":
                selected.to_csv(tmp, index=False)
            else:
                import pyarrow.parquet as pq

                pq.write_table(selected, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _format_of(path: Path, what: str) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in DATA_FORMATS:
        raise InvalidInputError(f"{what} {path}: unknown format {path.suffix or '(no suffix)'!r}; use "
                                f"{', '.join('.' + f for f in DATA_FORMATS)}")
    return fmt


def _id_strings(values: list[Any], path: Path) -> np.ndarray:
    bad = next((v for v in values if v is None or isinstance(v, (bool, float, dict, list))), "ok")
    if bad != "ok":
        raise InvalidInputError(f"{path}: the id column holds {bad!r}; ids must be strings or whole numbers")
    return np.array([str(v) for v in values], dtype=str)


def read_data_file(path: str | os.PathLike[str]) -> DataFile:
    """Read a data file (jsonl, json, csv, parquet) and the id of each row (an ``id`` column/key when
    present, else the row number), or one clear InvalidInputError."""
    path = Path(path)
    fmt = _format_of(path, "data file")
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is not a file")
    try:
        if fmt == "jsonl":
            rows = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
            records = [json.loads(line) for line in rows]
        elif fmt == "json":
            rows = records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise InvalidInputError(f"data file {path} must hold a JSON array of objects (one per example)")
        elif fmt == "csv":
            import pandas as pd

            rows = pd.read_csv(path, dtype=str, keep_default_na=False)  # cells as the text they hold: 007 stays 007
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path)
    except InvalidInputError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as e:  # json, pandas and pyarrow parse errors are ValueErrors
        raise InvalidInputError(f"data file {path} is not readable {fmt} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fmt in ("jsonl", "json"):
        if any(not isinstance(r, dict) for r in records):
            raise InvalidInputError(f"data file {path}: every {'line' if fmt == 'jsonl' else 'element'} must be a JSON object")
        has_id = bool(records) and all("id" in r for r in records)
        if not has_id and any("id" in r for r in records):
            first = next(i for i, r in enumerate(records) if "id" not in r)
            raise InvalidInputError(f"data file {path}: row {first} has no 'id' while others do; give every row an id")
        ids = _id_strings([r["id"] for r in records], path) if has_id else None
        n = len(records)
    elif fmt == "csv":
        has_id, n = "id" in rows.columns, len(rows)
        ids = rows["id"].to_numpy(dtype=str) if has_id else None
    else:
        has_id, n = "id" in rows.column_names, rows.num_rows
        ids = _id_strings(rows.column("id").to_pylist(), path) if has_id else None
    if n == 0:
        raise InvalidInputError(f"data file {path} holds no rows")
    if ids is None:
        ids = np.arange(n).astype(str)
    return DataFile(path, fmt, ids, rows, has_id)


def check_output(output: str | os.PathLike[str], data: str | os.PathLike[str]) -> Path:
    """The output path, checked against the data file: same format, not the data file itself, a folder
    that exists, not inside a Zarr store."""
    out, src = Path(output), Path(data)
    fmt = _format_of(out, "output")
    if fmt != _format_of(src, "data file"):
        raise InvalidInputError(f"output {out} is {fmt} but the data file is {src.suffix.lstrip('.')}; rows are written in "
                                f"the data file's own format: name the output *{src.suffix}")
    if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
        raise InvalidInputError(f"output {out} is the data file itself; write the selection to a new file")
    if out.is_dir():
        raise InvalidInputError(f"output {out} is a folder; give a file name")
    if not out.parent.is_dir():
        raise InvalidInputError(f"cannot write {out}: the folder {out.parent} does not exist")
    store = next((p for p in out.resolve().parents if (p / "zarr.json").is_file()), None)
    if store is not None:
        raise InvalidInputError(f"cannot write {out}: it is inside the Zarr store {store}; write it outside")
    return out


def _match(data: DataFile, train_ids: np.ndarray) -> np.ndarray:
    """Position in the data file of each store train row, or InvalidInputError naming the mismatch."""
    uniq, counts = np.unique(data.ids, return_counts=True)
    if len(uniq) != len(data.ids):
        raise InvalidInputError(f"data file {data.path}: duplicate ids {uniq[counts > 1][:5].tolist()}; every row needs a unique id")
    order = np.argsort(data.ids, kind="stable")
    sorted_ids = data.ids[order]
    pos = np.searchsorted(sorted_ids, train_ids).clip(max=len(sorted_ids) - 1)
    found = sorted_ids[pos] == train_ids
    how = "its 'id' column" if data.by_id_column else "row numbers 0..N-1 (it has no 'id' column)"
    if not found.all() or len(data.ids) != len(train_ids):
        missing = train_ids[~found]
        extra = np.setdiff1d(data.ids, train_ids)
        detail = []
        if len(missing):
            detail.append(f"{len(missing)} store train ids are not in it (first {missing[:3].tolist()})")
        if len(extra):
            detail.append(f"{len(extra)} of its ids are not store train ids (first {extra[:3].tolist()})")
        hint = "" if data.by_id_column else "; add an 'id' column holding the store's train ids"
        raise InvalidInputError(f"data file {data.path} does not match the store's {len(train_ids)} train ids by {how}: "
                                f"{'; '.join(detail)}{hint}")
    return order[pos]


@dataclasses.dataclass(frozen=True)
class Selection:
    """The result of :func:`select`: the removed train rows (store row numbers in rank order, their ids and
    aggregate scores), the ids of the written rows, and those rows as a frame (:meth:`to_pandas`): the
    data file's own columns when a data file was given, else ``train_id``, ``train_index``, ``rank`` and
    ``score`` (rank and score only for removed rows)."""

    remove: str
    removed_index: np.ndarray
    removed_ids: np.ndarray
    removed_scores: np.ndarray
    written: str
    written_ids: np.ndarray
    frame: pd.DataFrame
    measure: str
    num_columns: int

    def to_pandas(self) -> pd.DataFrame:
        return self.frame


def _check(remove: str, top: int, write: str, n: int) -> None:
    if remove not in REMOVE:
        raise InvalidInputError(f"remove must be 'harmful' (opponents: raise the query loss) or 'helpful' (proponents), not {remove!r}")
    if write not in WRITE:
        raise InvalidInputError(f"write must be 'kept' or 'removed', not {write!r}")
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
        raise InvalidInputError(f"top must be a whole number >= 1, not {top!r}")
    if top >= n:
        raise InvalidInputError(f"top={top} would remove all {n} training examples or more; use top <= {n - 1}")


def select(
    store: Store, query_set: str, queries: Any = None, *, remove: Literal["harmful", "helpful"] = "harmful", top: int,
    measure: str = DEFAULT_MEASURE, write: Literal["kept", "removed"] = "kept", data: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None, ids_output: str | os.PathLike[str] | None = None, backend: str = "auto",
) -> Selection:
    """Rank the train examples by aggregate influence on ``query_set``, remove the top ``top`` harmful or
    helpful ones, and return (and with ``output``, write) the kept or removed rows. See the module doc."""
    _check(remove, top, write, store.n_train)
    store.query_ids(query_set)  # an unknown query set fails here, before any file is read
    if output is not None and data is None:
        raise InvalidInputError("output writes rows of a data file: give data= (--data FILE) too, or only ids_output")
    out = check_output(output, data) if output is not None else None
    ids_out = Path(ids_output) if ids_output is not None else (out.with_name(out.name + ".ids.txt") if out is not None else None)
    if ids_out is not None and ids_out.parent and not ids_out.parent.is_dir():
        raise InvalidInputError(f"cannot write {ids_out}: the folder {ids_out.parent} does not exist")
    if ids_out is not None and any(p is not None and ids_out.resolve() == Path(p).resolve() for p in (data, out)):
        raise InvalidInputError(f"ids output {ids_out} is the data file or the output itself; name another file")
    data_file = read_data_file(data) if data is not None else None
    train_ids = store.train_ids
    position = _match(data_file, train_ids) if data_file is not None else None
    # Everything is checked; now the one scan.
    result = store.influence(query_set, queries, k=top, measure=measure, side=REMOVE[remove], backend=backend)  # type: ignore[arg-type]
    side = REMOVE[remove]
    removed = result.indices[side][0].astype(np.int64)
    scores = result.scores[side][0]
    if write == "removed":
        rows = removed
    else:
        keep = np.ones(store.n_train, bool)
        keep[removed] = False
        rows = np.flatnonzero(keep)
        if position is not None:  # the data file's own order
            rows = rows[np.argsort(position[rows], kind="stable")]
    written_ids = train_ids[rows]
    if data_file is not None:
        chosen = data_file.take(position[rows])
        frame = data_file.frame(chosen)
        if out is not None:
            data_file.write(chosen, out)
    else:
        import pandas as pd

        rank = np.full(store.n_train, -1, np.int64)
        rank[removed] = np.arange(1, len(removed) + 1)
        score = np.full(store.n_train, np.nan)
        score[removed] = scores
        frame = pd.DataFrame({"train_id": written_ids, "train_index": rows,
                              "rank": pd.array(np.where(rank[rows] > 0, rank[rows], 0), dtype="Int64"),
                              "score": score[rows]})
        frame.loc[frame["rank"] == 0, "rank"] = pd.NA
    if ids_out is not None:
        tmp = ids_out.with_name(ids_out.name + ".partial")
        tmp.write_text("".join(f"{i}\n" for i in written_ids), encoding="utf-8")
        os.replace(tmp, ids_out)
    return Selection(remove, removed, train_ids[removed], scores, write, written_ids, frame, result.measure, result.num_columns)
