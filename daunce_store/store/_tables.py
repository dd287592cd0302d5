"""Writing tables: the one place that turns pandas frames (or flat records) into json, jsonl, csv or parquet, to a file
(written whole under a temporary name, then renamed) or to a text stream such as stdout.

Used by loss exports (``LossStore.export``), attribution results (``Attribution.write``) and the CLI.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

from daunce_store.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TableFormat", "TABLE_FORMATS", "STREAMING_FORMATS", "ExportForm", "EXPORT_FORMS", "write_frames", "write_records", "write_json", "json_ready", "dumps_json"]

TableFormat = Literal["json", "jsonl", "csv", "parquet"]
TABLE_FORMATS: tuple[TableFormat, ...] = get_args(TableFormat)
STREAMING_FORMATS: tuple[TableFormat, ...] = ("jsonl", "csv", "parquet")  # written frame by frame, so any size fits (json is one array)
ExportForm = Literal["wide", "long"]  # the loss matrices exported: one column per perturbation, or one row per loss
EXPORT_FORMS: tuple[ExportForm, ...] = get_args(ExportForm)


def _write(frames: Iterable[pd.DataFrame], f: IO[Any], fmt: str, binary: bool) -> int:
    import pandas as pd

    def put(text: str) -> None:
        f.write(text.encode() if binary else text)

    rows = 0
    if fmt == "json":  # one array: gather first
        frames = [pd.concat(list(frames), ignore_index=True)]
    writer = None
    try:
        for i, df in enumerate(frames):
            if fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema)
                writer.write_table(table)
            elif fmt == "csv":
                put(df.to_csv(header=(i == 0), index=False))
            elif fmt == "jsonl":
                text = df.to_json(orient="records", lines=True)
                put(text if text.endswith("\n") or not text else text + "\n")
            else:
                put(df.to_json(orient="records", indent=1) + "\n")
            rows += len(df)
    finally:
        if writer is not None:
            writer.close()
    return rows


def write_frames(frames: Iterable[pd.DataFrame], target: str | os.PathLike[str] | IO[str], fmt: str) -> int:
    """Write ``frames`` (one table, in pieces) as ``fmt`` to a file path or a text stream; returns the
    rows written. A file is written under ``NAME.partial`` and renamed, so a failed write leaves nothing
    under the asked-for name."""
    return _to_target(target, fmt, lambda f, binary: _write(frames, f, fmt, binary))


def json_ready(value: Any, *, nan_as_null: bool = False, what: str = "the output") -> Any:
    """``value`` (dicts, lists, tuples, numbers, ...) with every float finite, for strict JSON (which has no
    NaN or Infinity: Python's ``json`` writes them as bare tokens that other parsers reject, and a CSV or
    parquet reader takes them as numbers). ``nan_as_null``: a NaN means "not computed" (a bootstrap statistic
    without resamples) and becomes None; otherwise a NaN, and an infinity always, is an InvalidInputError
    naming where it is, never written."""
    def walk(v: Any, where: str) -> Any:
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            if nan_as_null and math.isnan(v):
                return None
            raise InvalidInputError(
                f"{what}: {where} is {v}, which no output format may hold (JSON has no NaN or Infinity); "
                "this is a bug in what computed it, or losses beyond float32 (see MAX_ABS_LOSS): nothing was written"
            )
        if isinstance(v, dict):
            return {k: walk(x, f"{where}[{k!r}]") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return walk(value, "value")


def dumps_json(value: Any, *, nan_as_null: bool = False, what: str = "the output", **options: Any) -> str:
    """``json.dumps`` of :func:`json_ready` ``(value)``, with ``allow_nan=False`` as the last guard."""
    return json.dumps(json_ready(value, nan_as_null=nan_as_null, what=what), allow_nan=False, **options)


def write_records(
    records: list[dict[str, Any]], target: str | os.PathLike[str] | IO[str], fmt: str, columns: Sequence[str]
) -> int:
    """Like :func:`write_frames` for a list of flat records with these ``columns`` (e.g. attribution
    results). json and jsonl are written with the standard library, so a CLI answer does not wait for
    pandas to import (0.3 s). In every format a NaN or infinite value is an error (:func:`json_ready`),
    before anything is written."""
    records = json_ready(records, what=f"the {fmt} records")
    if fmt not in ("json", "jsonl"):
        import pandas as pd

        return write_frames([pd.DataFrame.from_records(records, columns=list(columns))], target, fmt)

    def write(f: IO[Any], binary: bool) -> int:
        if fmt == "json":
            text = json.dumps(records, indent=1, separators=(",", ":"), allow_nan=False) + "\n"
        else:
            text = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)
        f.write(text.encode() if binary else text)
        return len(records)

    return _to_target(target, fmt, write)


def write_json(value: Any, target: str | os.PathLike[str] | IO[str]) -> None:
    """One strict JSON document (e.g. a ranking's envelope, already :func:`json_ready`) to a file, written
    whole under a temporary name, or to a text stream."""
    text = json.dumps(value, indent=1, separators=(",", ":"), allow_nan=False) + "\n"

    def write(f: IO[Any], binary: bool) -> int:
        f.write(text.encode() if binary else text)
        return 1

    _to_target(target, "json", write)


def _to_target(target: str | os.PathLike[str] | IO[str], fmt: str, write: Callable[[IO[Any], bool], int]) -> int:
    """Run ``write(f, binary)`` on a text stream, or on a file written whole under a temporary name."""
    if fmt not in TABLE_FORMATS:
        raise InvalidInputError(f"unknown table format {fmt!r}; use {', '.join(TABLE_FORMATS)}")
    if not isinstance(target, (str, os.PathLike)):
        if fmt == "parquet":
            raise InvalidInputError("parquet is a binary format: give an output file (--output PATH)")
        return write(target, False)
    path = Path(target)
    if path.is_dir():
        raise InvalidInputError(f"cannot write {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise InvalidInputError(f"cannot write {path}: the folder {path.parent} {what}")
    store = next((p for p in path.resolve().parents if (p / "zarr.json").is_file()), None)
    if store is not None:  # e.g. `-o STORE/zarr.json` would overwrite the store's own metadata
        raise InvalidInputError(f"cannot write {path}: it is inside the Zarr store {store}; write the table outside it")
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            rows = write(f, True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
