"""The examples behind the ids: rows of the user's data files (jsonl/ndjson, json, csv/tsv, parquet), keyed
by the store's ids, turned into what the page shows.

A row's id is its ``id`` column when the file has one, else its row number (``0``, ``1``, ...): the
convention of the rest of the project for data files. Each other column gets a kind from its first value,
once: ``pixels`` (a list or array of numbers whose size is a square, or a 2-d / h × w × 3 nested list),
``image`` (a ``data:image/png|jpeg|gif|webp;base64,...`` string), ``image-file`` (a path to a .png, .jpg,
.jpeg, .gif or .webp file, relative to the data file), ``value`` (a number or bool) or ``text``
(anything else). The page renders text as text (never as markup) and images as images.

Image files are served only where the file, symlinks followed, lies under the data file's folder or a
``--files-root`` folder, and only when its real name is an image's: a row naming ``evil.png`` that links to
``/etc/passwd`` is refused, and the refusal says which rule refused it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError, UnknownIdError
from daunce_store.store import DATA_FILE_FORMATS, read_data_file
from daunce_store.store._inputs import ID_FIELD

__all__ = ["DATA_SUFFIXES", "ExampleData", "RefusedFileError", "read_examples"]

DATA_SUFFIXES = tuple(DATA_FILE_FORMATS)
LABEL_COLUMNS = ("label", "labels", "target", "class", "y")  # shown beside each example's score
IMAGE_DATA = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]+$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


class RefusedFileError(InvalidInputError):
    """A file a row names exists but may not be served (a 403 saying which rule refused it)."""


@dataclasses.dataclass(frozen=True)
class ExampleData:
    """One data file's rows by example id: ``content(ids)`` gives what the page shows for each."""

    path: Path
    rows: dict[str, int]  # example id -> row of ``columns``
    columns: dict[str, list[Any]]  # column -> values, without the id column
    kinds: dict[str, str]  # column -> pixels | image | image-file | value | text
    pixel_range: dict[str, tuple[float, float]]  # pixels column -> (min, max) over the file: one brightness scale
    label_column: str | None
    matched: int  # how many of the store's ids of this set have a row here
    expected: int  # how many ids the store's set has
    roots: tuple[Path, ...] = ()  # resolved folders image files may be served from (the data file's, --files-root)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": len(self.rows), "columns": self.kinds, "label_column": self.label_column,
                "files_roots": [str(r) for r in self.roots],
                "ids_with_data": self.matched, "ids_in_store": self.expected}

    def content(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Per id, ``{"label": ..., "fields": [{"name", "kind", "value"}, ...]}`` (None: no row for it); the
        label column is the label, not a field too. An ``image-file`` field's value is the file name when it
        may be served (else None: the page asks only for images that are there)."""
        out: dict[str, dict[str, Any] | None] = {}
        for example in ids:
            row = self.rows.get(example)
            if row is None:
                out[example] = None
                continue
            fields = [{"name": c, "kind": kind, "value": self._value(c, kind, self.columns[c][row], example)}
                      for c, kind in self.kinds.items() if c != self.label_column]
            label = self.columns[self.label_column][row] if self.label_column else None
            out[example] = {"label": _plain(label), "fields": fields}
        return out

    def image_file(self, example: str, column: str) -> Path:
        """The image file a row names in an ``image-file`` column (relative to the data file's folder), resolved;
        :class:`RefusedFileError` naming the rule when it may not be served, UnknownIdError when it is gone."""
        if self.kinds.get(column) != "image-file":
            raise InvalidInputError(f"column {column!r} of {self.path} does not hold image file paths")
        row = self.rows.get(example)
        if row is None:
            raise UnknownIdError(f"id {example!r} has no row in {self.path}")
        value = self.columns[column][row]
        if not isinstance(value, str) or not value:
            raise UnknownIdError(f"id {example!r} names no file in column {column!r}")
        named = Path(value) if Path(value).is_absolute() else self.path.parent / value
        if not named.name.lower().endswith(IMAGE_SUFFIXES):
            raise RefusedFileError(f"{value!r} (id {example!r}) is not an image file name ({', '.join(IMAGE_SUFFIXES)}): only images are served")
        try:
            real = named.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a dangling link, a link loop
            raise UnknownIdError(f"the image of {example!r} in column {column!r} ({value!r}) is not on disk") from None
        if not any(real.is_relative_to(root) for root in self.roots):
            raise RefusedFileError(f"{value!r} (id {example!r}) lies, symlinks followed, outside the folders files are served from "
                                   f"({', '.join(map(str, self.roots))}): move it under one, or start the server with --files-root FOLDER")
        if not real.name.lower().endswith(IMAGE_SUFFIXES):
            raise RefusedFileError(f"{value!r} (id {example!r}) links to a file whose name is not an image's "
                                   f"({', '.join(IMAGE_SUFFIXES)}): only images are served")
        if not real.is_file():
            raise RefusedFileError(f"{value!r} (id {example!r}) is not a regular file: only image files are served")
        return real

    def servable(self, example: str, column: str) -> bool:
        try:
            self.image_file(example, column)
        except (InvalidInputError, UnknownIdError):
            return False
        return True

    def _value(self, column: str, kind: str, value: Any, example: str = "") -> Any:
        if kind == "pixels":
            arr = _pixel_array(value)
            if arr is None:
                return None
            low, high = self.pixel_range[column]
            return {"height": arr.shape[0], "width": arr.shape[1], "channels": 1 if arr.ndim == 2 else 3,
                    "min": low, "max": high, "values": [_plain(v) for v in arr.ravel().tolist()]}
        if kind == "image":
            return value if isinstance(value, str) and IMAGE_DATA.match(value) else None
        if kind == "image-file":
            return value if self.servable(example, column) else None  # the page fetches /api/image only for these
        if kind == "text" and not isinstance(value, str):
            return None if _missing(value) else json.dumps(_plain(value), default=str)
        return _plain(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A JSON-safe Python value: numpy scalars unwrapped, NaN/inf as None, arrays as lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pixel_array(value: Any) -> np.ndarray | None:
    """A list of numbers as an (h, w) or (h, w, 3) array, or None when it is not one."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        arr = np.asarray(value.tolist() if isinstance(value, np.ndarray) and value.dtype == object else value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged lists, strings inside
        return None
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        return arr.reshape(side, side) if arr.size >= 4 and side * side == arr.size else None
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
        return arr if arr.size else None
    return None


def _image_path(data_path: Path, value: Any) -> Path | None:
    if not isinstance(value, str) or not value.lower().endswith(IMAGE_SUFFIXES):
        return None
    path = Path(value) if Path(value).is_absolute() else data_path.parent / value
    return path if path.is_file() else None


def _kind(data_path: Path, values: list[Any]) -> str:
    first = next((v for v in values if not _missing(v)), None)
    if isinstance(first, str):
        if IMAGE_DATA.match(first):
            return "image"
        return "image-file" if _image_path(data_path, first) is not None else "text"
    if isinstance(first, (bool, int, float, np.number, np.bool_)):
        return "value"
    return "pixels" if _pixel_array(first) is not None else "text"


def read_examples(path: str | Path, store_ids: np.ndarray, what: str, files_roots: Sequence[str | Path] = ()) -> ExampleData:
    """Read a data file for the ids ``store_ids`` of one set (``what``: "train" or "query set 'test'");
    image files it names are served from its folder and ``files_roots`` only.

    Every check happens here, before the server starts: the file's own (:func:`daunce_store.store.read_data_file`:
    format, content, ids), and a file none of whose ids is an id of that set (the wrong file, or one
    without an ``id`` column whose rows the store does not number).
    """
    data = read_data_file(path)
    path, ids = data.path, data.ids
    rows = {example: i for i, example in enumerate(ids)}
    store_ids = np.asarray(store_ids).astype(str)
    wanted = set(store_ids.tolist())
    matched = sum(1 for example in rows if example in wanted)
    if matched == 0:
        how = "the ids in its `id` column" if data.by_id_column else "its row numbers (it has no `id` column)"
        raise InvalidInputError(
            f"data file {path}: none of {how} ({ids[0]!r}, ...) is an id of the store's {what} "
            f"({str(store_ids[0]) if len(store_ids) else ''!r}, ...); give the file an `id` column holding the store's ids"
        )
    names = dict.fromkeys(name for row in data.rows for name in row if name != ID_FIELD)  # in first-seen order
    columns = {str(c): [row.get(c) for row in data.rows] for c in names}
    kinds = {c: _kind(path, values) for c, values in columns.items()}
    pixel_range = {}
    for c, kind in kinds.items():
        if kind == "pixels":
            arrays = [a for a in (_pixel_array(v) for v in columns[c]) if a is not None]
            pixel_range[c] = (float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays)))
    label = next((c for c in LABEL_COLUMNS if c in kinds and kinds[c] in ("value", "text")), None)
    roots = []
    for root in (path.parent, *files_roots):
        if not Path(root).is_dir():
            raise InvalidInputError(f"--files-root {root}: not a folder")
        roots.append(Path(root).resolve())
    return ExampleData(path, rows, columns, kinds, pixel_range, label, matched, len(wanted), tuple(dict.fromkeys(roots)))
