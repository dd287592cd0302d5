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

Formats (read by :func:`daunce_store.store.read_data_file`): ``.jsonl``/``.ndjson`` (lines copied byte for
byte), ``.json`` (an array of objects), ``.csv``/``.tsv`` (cells kept as the text the file holds) and
``.parquet``/``.pq`` (rows taken with pyarrow, schema kept). Kept rows are written in
the file's order; removed rows in rank order (the most influential first). The ids of the written rows,
in the same order, go to a sidecar text file, one per line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring import DEFAULT_MEASURE, Attribution, BackendChoice, Side
from daunce_store.store import DATA_FILE_FORMATS, DataFile, data_file_format, read_data_file

if TYPE_CHECKING:
    import pandas as pd


__all__ = ["Remove", "REMOVE", "Write", "WRITE", "DATA_FORMATS", "Selection", "select", "read_data_file", "check_output"]

Remove = Literal["harmful", "helpful"]
#: What to remove, and the influence side it is ranked on.
REMOVE: dict[Remove, Side] = {"helpful": "pos", "harmful": "neg"}
Write = Literal["kept", "removed"]
#: Which rows to write.
WRITE: tuple[Write, ...] = get_args(Write)
#: Data file formats (the suffixes of each: :data:`daunce_store.store.DATA_FILE_FORMATS`).
DATA_FORMATS = tuple(dict.fromkeys(DATA_FILE_FORMATS.values()))


class Ranker(Protocol):
    """What :func:`select` needs of the store (the façade's ``Store``, which imports this module)."""

    @property
    def n_train(self) -> int: ...
    @property
    def train_ids(self) -> np.ndarray: ...
    def query_ids(self, name: str) -> np.ndarray: ...
    def influence(self, query_set: str, queries: Any = None, *, k: int, measure: str, side: Side, backend: BackendChoice) -> Attribution: ...


def _frame(data: DataFile, positions: np.ndarray) -> pd.DataFrame:
    """The data file's rows at ``positions`` as a frame of its own columns."""
    import pandas as pd

    if data.fmt == "parquet":
        return data.table.take(positions).to_pandas()
    columns = list(data.rows[0]) if data.fmt in ("csv", "tsv") else None  # every CSV row has every column
    return pd.DataFrame.from_records([data.rows[i] for i in positions], columns=columns)


def _write(data: DataFile, positions: np.ndarray, path: Path) -> None:
    """Write the data file's rows at ``positions`` in its own format (jsonl lines byte for byte, the parquet
    schema kept) under a temporary name, then rename."""
    tmp = path.with_name(path.name + ".partial")
    try:
        if data.fmt == "jsonl":
            assert data.lines is not None  # read_data_file keeps a jsonl file's lines
            with open(tmp, "wb") as f:
                f.writelines(line if line.endswith(b"\n") else line + b"\n" for line in (data.lines[i] for i in positions))
        elif data.fmt == "json":
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump([data.rows[i] for i in positions], f, ensure_ascii=False, indent=1)
                f.write("\n")
        elif data.fmt in ("csv", "tsv"):
            _frame(data, positions).to_csv(tmp, sep="\t" if data.fmt == "tsv" else ",", index=False)
        else:
            import pyarrow.parquet as pq

            pq.write_table(data.table.take(positions), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(output: str | os.PathLike[str], data: str | os.PathLike[str]) -> Path:
    """The output path, checked against the data file: same format, not the data file itself, a folder
    that exists, not inside a Zarr store."""
    out, src = Path(output), Path(data)
    fmt = data_file_format(out, "output")
    if fmt != data_file_format(src):
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
    ids = np.array(data.ids, dtype=str)  # unique: read_data_file refuses a duplicate
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.searchsorted(sorted_ids, train_ids).clip(max=len(sorted_ids) - 1)
    found = sorted_ids[pos] == train_ids
    how = "its 'id' column" if data.by_id_column else "row numbers 0..N-1 (it has no 'id' column)"
    if not found.all() or len(ids) != len(train_ids):
        missing = train_ids[~found]
        extra = np.setdiff1d(ids, train_ids)
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
    store: Ranker, query_set: str, queries: Any = None, *, remove: Remove = "harmful", top: int,
    measure: str = DEFAULT_MEASURE, write: Write = "kept", data: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None, ids_output: str | os.PathLike[str] | None = None, backend: BackendChoice = "auto",
) -> Selection:
    """Rank the train examples by aggregate influence on ``query_set``, remove the top ``top`` harmful or
    helpful ones, and return (and with ``output``, write) the kept or removed rows. See the module doc."""
    _check(remove, top, write, store.n_train)
    store.query_ids(query_set)  # an unknown query set fails here, before any file is read
    if output is not None and data is None:
        raise InvalidInputError("output writes rows of a data file: give data= (--data FILE) too, or only ids_output")
    out = check_output(output, data) if output is not None and data is not None else None
    ids_out = Path(ids_output) if ids_output is not None else (out.with_name(out.name + ".ids.txt") if out is not None else None)
    if ids_out is not None and ids_out.parent and not ids_out.parent.is_dir():
        raise InvalidInputError(f"cannot write {ids_out}: the folder {ids_out.parent} does not exist")
    if ids_out is not None and any(p is not None and ids_out.resolve() == Path(p).resolve() for p in (data, out)):
        raise InvalidInputError(f"ids output {ids_out} is the data file or the output itself; name another file")
    data_file = read_data_file(data) if data is not None else None
    train_ids = store.train_ids
    position = _match(data_file, train_ids) if data_file is not None else None
    # Everything is checked; now the one scan.
    result = store.influence(query_set, queries, k=top, measure=measure, side=REMOVE[remove], backend=backend)
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
    if data_file is not None and position is not None:
        frame = _frame(data_file, position[rows])
        if out is not None:
            _write(data_file, position[rows], out)
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
