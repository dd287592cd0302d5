"""Loss matrices out of a store, as pandas frames or files (parquet, csv, jsonl), with their ids.

Two shapes:

* ``wide`` (default): one row per example, columns ``set`` (``train`` or a query-set name), ``id``, then
  one float32 column per committed perturbation (in slot order). A query set with no losses for a
  perturbation has NaN there. This is the matrix a pandas user wants (``df.set_index(["set", "id"])``).
* ``long``: one row per (example, perturbation): ``set``, ``id``, ``perturbation``, ``loss``.

Files are written one row block at a time, so exporting does not need the whole matrix in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.store._records import Snapshot
from daunce_store.store._shape import StoreShape
from daunce_store.store._tables import EXPORT_FORMS, STREAMING_FORMATS, ExportForm, write_frames

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EXPORT_FORMATS", "export_losses", "losses_to_pandas"]

EXPORT_FORMATS = STREAMING_FORMATS
KEY_COLUMNS = ("set", "id")


def _frames(store: StoreShape, form: ExportForm, snapshot: Snapshot | None, block_rows: int | None) -> Iterator[pd.DataFrame]:
    import pandas as pd

    if form not in EXPORT_FORMS:
        raise InvalidInputError(f"form must be {' or '.join(map(repr, EXPORT_FORMS))}, not {form!r}")
    snap = snapshot or store.snapshot()
    names = list(snap.perturbations)
    if form == "wide" and set(names) & set(KEY_COLUMNS):
        raise InvalidInputError(
            f"a perturbation is named {sorted(set(names) & set(KEY_COLUMNS))}, which clashes with the key "
            "columns of the wide form; export with form='long'"
        )
    position = {slot: j for j, slot in enumerate(snap.slots)}

    def frame(set_name: str, ids: np.ndarray, block: np.ndarray, cols: list[str]) -> pd.DataFrame:
        if form == "wide":
            data = {"set": np.full(len(ids), set_name, dtype=object), "id": ids.astype(object)}
            data.update({name: block[:, j] for j, name in enumerate(cols)})
            return pd.DataFrame(data, columns=[*KEY_COLUMNS, *cols])
        k = len(cols)
        return pd.DataFrame(
            {
                "set": np.full(len(ids) * k, set_name, dtype=object),
                "id": np.repeat(ids.astype(object), k),
                "perturbation": np.tile(np.array(cols, dtype=object), len(ids)),
                "loss": block.reshape(-1),
            }
        )

    train_ids = store.train_ids
    for offset, block in store.iter_row_blocks(snapshot=snap, block_rows=block_rows):
        yield frame("train", train_ids[offset : offset + len(block)], block, names)
    for qset in store.query_sets():
        slots = list(snap.query_slots.get(qset, ()))
        losses = store.query_losses(qset, snapshot=snap)  # (m, len(slots)), slot order
        ids = store.query_ids(qset)
        if form == "wide":  # align to every committed perturbation, NaN where this set has none
            full = np.full((len(ids), len(names)), np.nan, dtype=np.float32)
            full[:, [position[s] for s in slots]] = losses
            yield frame(qset, ids, full, names)
        else:
            yield frame(qset, ids, np.ascontiguousarray(losses), [names[position[s]] for s in slots])


def losses_to_pandas(store: StoreShape, *, form: ExportForm = "wide", snapshot: Snapshot | None = None) -> pd.DataFrame:
    """The train and query loss matrices of ``store`` in one frame (see the module docstring)."""
    import pandas as pd

    return pd.concat(list(_frames(store, form, snapshot, None)), ignore_index=True)


def export_losses(
    store: StoreShape,
    path: str | os.PathLike[str],
    *,
    form: ExportForm = "wide",
    fmt: str | None = None,
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
) -> int:
    """Write the loss matrices to ``path`` (format from ``fmt`` or the suffix), one row block at a time;
    returns the rows written."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"export needs a file path (.parquet, .csv or .jsonl), not {type(path).__name__}")
    fmt = fmt or Path(path).suffix.lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"cannot export to {Path(path).name!r}: use a .parquet, .csv or .jsonl file (or fmt=)")
    if not Path(path).parent.is_dir():
        raise InvalidInputError(f"cannot export to {path}: the folder {Path(path).parent} does not exist")
    return write_frames(_frames(store, form, snapshot, block_rows), path, fmt)
