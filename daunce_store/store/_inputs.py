"""Reading ids and loss vectors from the files users bring: text, CSV, parquet, .npy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from daunce_store.errors import InvalidInputError

__all__ = ["read_ids", "read_losses", "validate_ids", "validate_losses"]


def _read_table_column(path: Path, column: str | None) -> np.ndarray:
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if column is None:
        if frame.shape[1] != 1:
            raise InvalidInputError(
                f"{path} has columns {list(frame.columns)}; name the one to use (e.g. FILE:COLUMN)"
            )
        column = str(frame.columns[0])
    if column not in frame.columns:
        raise InvalidInputError(f"{path} has no column {column!r}; it has {list(frame.columns)}")
    return frame[column].to_numpy()


def _split_column(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:COLUMN`` (a colon in an existing path is part of the path)."""
    text = os.fspath(spec)
    if not Path(text).exists() and ":" in text:
        head, _, column = text.rpartition(":")
        return Path(head), column
    return Path(text), None


def read_ids(spec: str | os.PathLike[str]) -> np.ndarray:
    """Example ids from a text file (one per line), a CSV or a parquet file (``FILE[:COLUMN]``)."""
    path, column = _split_column(spec)
    if not path.exists():
        raise InvalidInputError(f"ids file {path} does not exist")
    if path.suffix in (".csv", ".parquet"):
        ids = _read_table_column(path, column)
    else:
        ids = np.array([line.rstrip("\r\n") for line in path.read_text().splitlines() if line.strip()])
    return validate_ids(ids, what=str(path))


def read_losses(spec: str | os.PathLike[str]) -> np.ndarray:
    """A loss vector from ``.npy``, ``.parquet`` or ``.csv`` (``FILE[:COLUMN]``)."""
    path, column = _split_column(spec)
    if not path.exists():
        raise InvalidInputError(f"loss file {path} does not exist")
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    elif path.suffix in (".csv", ".parquet"):
        values = _read_table_column(path, column)
    else:
        raise InvalidInputError(f"loss file {path}: use .npy, .parquet or .csv")
    return np.asarray(values)


def validate_ids(ids: object, *, what: str = "ids") -> np.ndarray:
    """Ids as a 1-d array of unique non-empty strings, or InvalidInputError."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInputError(f"{what}: expected a non-empty 1-d list of ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iuUTO":
        raise InvalidInputError(f"{what}: ids must be strings or integers, got dtype {arr.dtype}")
    values = arr.tolist()
    missing = [i for i, x in enumerate(values) if x is None or (isinstance(x, float) and x != x)]
    if missing:
        raise InvalidInputError(
            f"{what}: {len(missing)} ids are missing (None/NaN, first at position {missing[0]}); "
            "every example needs an id"
        )
    if arr.dtype.kind == "O" and any(not isinstance(x, (str, int, np.integer)) or isinstance(x, bool) for x in values):
        bad = next(x for x in values if not isinstance(x, (str, int, np.integer)) or isinstance(x, bool))
        raise InvalidInputError(f"{what}: ids must be strings or integers, got {type(bad).__name__} {bad!r}")
    strings = np.array([str(x) for x in values], dtype=object)
    blank = [i for i, s in enumerate(strings) if not s.strip()]
    if blank:
        raise InvalidInputError(
            f"{what}: ids must not be empty or blank strings (first at position {blank[0]})"
        )
    uniq, counts = np.unique(strings.astype(str), return_counts=True)
    if len(uniq) != len(strings):
        dupes = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"{what}: duplicate ids {dupes}; every example needs a unique id")
    return strings.astype(str)


def validate_losses(values: object, n: int, *, what: str) -> np.ndarray:
    """A finite float32 vector of length n, or InvalidInputError saying what is wrong."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"{what}: losses must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInputError(
            f"{what}: expected {n} losses (one per example, in id order), got shape {arr.shape}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as inf
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise InvalidInputError(
            f"{what}: {int(bad.sum())} losses are NaN or inf (first at rows {first}), "
            "or overflow float32; fix the loss computation before appending"
        )
    return np.ascontiguousarray(out)
