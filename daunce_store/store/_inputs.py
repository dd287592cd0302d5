"""Reading the files users bring: ids and loss vectors (text, CSV, parquet, .npy) and data files of
examples (jsonl, json, CSV/TSV, parquet, a saved ``datasets`` directory)."""

from __future__ import annotations

import dataclasses
import json
import os
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.errors import DivergedError, IdNormalizationWarning, InvalidInputError, MissingDependencyError

__all__ = ["DATA_FILE_FORMATS", "DataFile", "data_file_format", "data_file_specs", "read_data_file", "read_ids", "read_losses",
           "validate_ids", "validate_losses", "out_of_range", "out_of_range_summary", "DIVERGED_ADVICE", "json_mapping"]


def _check_file(path: Path, what: str) -> None:
    """The path names a non-empty regular file, or InvalidInputError saying what it is instead."""
    if not path.exists():
        raise InvalidInputError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"{what} file {path} is a directory; give the file itself")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{what} file {path} is empty (0 bytes); was it written completely?")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unreadable(path: Path, kind: str, error: BaseException) -> InvalidInputError:
    return InvalidInputError(f"{path} is not a readable {kind} file ({_first_line(error)})")


def read_table(path: Path, *, as_text: bool, layout: str, sep: str = ",") -> Any:
    """A CSV (``sep``: its delimiter) or parquet file as a DataFrame, or one clear InvalidInputError;
    ``as_text``: CSV cells as the strings the file holds (ids: ``007`` stays ``007``, ``NA`` stays ``NA``);
    ``layout``: what an empty CSV should have held."""
    import pandas as pd

    kind = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False) if as_text else pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise InvalidInputError(f"{path} holds no CSV header and no rows; write {layout}") from None
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as a UTF-8 {kind} file") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise _unreadable(path, kind, e) from None


def _read_table_column(path: Path, column: str | None, *, as_text: bool) -> np.ndarray:
    """One column of a CSV or parquet file; ``as_text``: every value as the string the file holds (ids:
    ``007`` stays ``007``, ``NA`` stays ``NA``), else pandas' numeric parsing (losses)."""
    frame = read_table(path, as_text=as_text, layout="a header line, then one value per row")
    if column is None:
        if frame.shape[1] != 1:
            raise InvalidInputError(
                f"{path} has columns {list(frame.columns)}; name the one to use (e.g. FILE:COLUMN)"
            )
        column = str(frame.columns[0])
    if column not in frame.columns:
        raise InvalidInputError(f"{path} has no column {column!r}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise InvalidInputError(f"{path} has a header but no rows; write one value per row under it")
    values = frame[column]
    if as_text and values.dtype.kind in "iu":  # parquet integer ids: the same strings a text file gives
        values = values.astype(str)
    return values.to_numpy()


def _split_column(spec: str | os.PathLike[str], what: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:COLUMN`` (a colon in an existing path is part of the path)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidInputError(f"{what} file must be a path, not {type(spec).__name__} {spec!r}")
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"{what} file {text!r}: give a path")
    if not Path(text).exists() and ":" in text:
        head, _, column = text.rpartition(":")
        return Path(head), column
    return Path(text), None


def read_ids(spec: str | os.PathLike[str]) -> np.ndarray:
    """Example ids from a text file (one per line), a CSV or a parquet file (``FILE[:COLUMN]``).

    Ids are read as the strings the file holds, in every format: ``007`` stays ``007``. A text file's lines
    end at ``\n`` or ``\r\n`` only (not at the other breaks ``str.splitlines`` knows: U+2028, NEL, form
    feed, ... may be part of an id); a leading UTF-8 byte order mark is dropped, and so are blank lines.
    """
    path, column = _split_column(spec, "ids")
    _check_file(path, "ids")
    if path.suffix in (".csv", ".parquet"):
        ids = _read_table_column(path, column, as_text=True)
    else:
        try:
            # -sig: drops the BOM some editors write first; bytes decoded, not read_text, whose universal
            # newlines would turn a lone \r into a line break before the check below sees it
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InvalidInputError(
                f"ids file {path} is not UTF-8 text (byte {e.start}: {e.reason}); give a text file with one id per line"
            ) from None
        if "\x00" in text:
            raise InvalidInputError(f"ids file {path} holds NUL bytes (a binary file?); give a text file with one id per line")
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        lone_cr = next((i for i, line in enumerate(lines) if "\r" in line), None)
        if lone_cr is not None:  # classic Mac line ends, or a stray CR: neither one id nor a line break for sure
            raise InvalidInputError(
                f"ids file {path}: line {lone_cr + 1} holds a carriage return (\\r) not followed by a newline; "
                "end lines with \\n or \\r\\n"
            )
        ids = np.array([line for line in lines if line.strip()])
    # The store validates them again (and warns about look-alikes there, once).
    return validate_ids(ids, what=str(path), check_normalization=False)


def read_losses(spec: str | os.PathLike[str], n: int | None = None) -> np.ndarray:
    """A loss vector from ``.npy``, ``.parquet`` or ``.csv`` (``FILE[:COLUMN]``).

    ``n``: the expected number of losses; a ``.npy`` file's header is checked against it (and against the
    file's size) before any data is read, so a bad header cannot make the reader allocate its claim.
    """
    path, column = _split_column(spec, "loss")
    _check_file(path, "loss")
    if path.suffix == ".npy":
        return _read_npy(path, n)
    if path.suffix not in (".csv", ".parquet"):
        raise InvalidInputError(f"loss file {path}: use .npy, .parquet or .csv")
    values = _read_table_column(path, column, as_text=False)
    if values.dtype.kind not in "fiu":  # name the first value that is not a number
        import pandas as pd

        numbers = pd.to_numeric(pd.Series(values), errors="coerce")
        bad = np.flatnonzero(numbers.isna().to_numpy() & pd.Series(values).notna().to_numpy())
        if len(bad):
            raise InvalidInputError(
                f"loss file {path}: row {int(bad[0])} holds {values[bad[0]]!r}, not a number; losses must be numbers"
            )
    return np.asarray(values)


def _read_npy(path: Path, n: int | None) -> np.ndarray:
    """A .npy loss vector, its header checked before the data is read."""
    from numpy.lib import format as npy

    hint = "save the losses with numpy.save(path, np.asarray(losses, dtype=np.float32))"
    with open(path, "rb") as f:
        try:
            version = npy.read_magic(f)
        except (ValueError, EOFError):
            raise InvalidInputError(f"loss file {path} is not a .npy file (no NumPy header); {hint}") from None
        try:
            if version == (1, 0):
                shape, fortran_order, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = npy.read_array_header_2_0(f)
            else:
                raise InvalidInputError(f"loss file {path}: .npy format version {version} is not supported; {hint}")
        except (ValueError, EOFError, SyntaxError) as e:
            raise InvalidInputError(f"loss file {path}: its .npy header is damaged ({_first_line(e)}); {hint}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise InvalidInputError(f"loss file {path} holds Python objects (a pickled object array), not numbers; {hint}")
    if dtype.kind not in "fiu":
        raise InvalidInputError(f"loss file {path} holds {dtype}, not numbers; losses must be numbers; {hint}")
    count = int(np.prod(shape, dtype=object))
    vector = len(shape) == 1 or (len(shape) == 2 and 1 in shape)
    if n is not None and (not vector or count != n):
        raise InvalidInputError(f"loss file {path}: expected {n} losses (one per example, in id order), the file holds shape {shape}")
    available = path.stat().st_size - offset
    if count * dtype.itemsize > available:
        raise InvalidInputError(
            f"loss file {path} is truncated: its header declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but only {available} bytes follow; write it again"
        )
    return np.load(path, allow_pickle=False)


def validate_ids(ids: object, *, what: str = "ids", check_normalization: bool = True) -> np.ndarray:
    """Ids as a 1-d array of unique non-empty strings, or InvalidInputError.

    ``check_normalization``: warn (:class:`~daunce_store.errors.IdNormalizationWarning`) when ids differ only
    in Unicode normalisation; they stay distinct ids.
    """
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
    broken = [i for i, s in enumerate(strings) if "\n" in s or "\r" in s]
    if broken:  # id files, `select --ids-output` and the text tables hold one id a line
        raise InvalidInputError(
            f"{what}: ids must be one line of text; {len(broken)} hold a line break (first at position {broken[0]}: "
            f"{strings[broken[0]]!r}); replace the line breaks in those ids"
        )
    uniq, counts = np.unique(strings.astype(str), return_counts=True)
    if len(uniq) != len(strings):
        dupes = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"{what}: duplicate ids {dupes}; every example needs a unique id")
    if check_normalization:
        _warn_lookalike_ids(strings, what)
    return strings.astype(str)


def _warn_lookalike_ids(strings: np.ndarray, what: str) -> None:
    """One IdNormalizationWarning naming the first ids that differ only in Unicode normalisation (the same NFC
    form: canonically equivalent, so they print alike; compatibility forms such as "ﬁ" vs "fi" are different
    text and not flagged). ASCII ids are their own NFC, so only the others are normalised (millions of ASCII
    ids cost one isascii each); an ASCII id is looked at only when another id's NFC is it (KELVIN SIGN -> K)."""
    first: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, s in enumerate(strings):
        if not s.isascii():
            j = first.setdefault(unicodedata.normalize("NFC", s), i)
            if j != i:
                pairs.append((j, i))
    ascii_forms = {key: i for key, i in first.items() if key.isascii()}
    if ascii_forms:
        pairs += [(i, ascii_forms[s]) for i, s in enumerate(strings) if s in ascii_forms and s.isascii()]
    if pairs:
        pairs.sort()
        shown = "; ".join(f"{strings[j]!r} (row {j}, {_form(strings[j])}) and {strings[i]!r} (row {i}, {_form(strings[i])})"
                          for j, i in pairs[:3])
        more = f" and {len(pairs) - 3} more pairs" if len(pairs) > 3 else ""
        warnings.warn(
            f"{what}: ids that differ only in Unicode normalisation: {shown}{more}; they are kept as different ids "
            "(a lookup by one never finds the other): write every id in one form, e.g. NFC",
            IdNormalizationWarning, stacklevel=3,
        )


def _form(s: str) -> str:
    """Which normal form ``s`` is in, for the warning."""
    return next((f for f in ("NFC", "NFD") if unicodedata.is_normalized(f, s)), "neither NFC nor NFD")


def validate_losses(values: object, n: int, *, what: str) -> np.ndarray:
    """A float32 vector of length n with every |loss| <= ``MAX_ABS_LOSS``, or InvalidInputError saying what is
    wrong (:class:`~daunce_store.errors.DivergedError` for NaN, inf or too large values).

    Every append path (``append``, ``append_query_losses``, ``append_matrix``, the perturbation runner) goes
    through this rule, so a store never holds a loss whose float32 scores could overflow.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"{what}: losses must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInputError(
            f"{what}: expected {n} losses (one per example, in id order), got shape {arr.shape}"
        )
    bad = out_of_range(arr)  # on the values as given: 1e300 in float64 is "too large", not an inf made by the cast
    if bad.any():
        raise DivergedError(f"{what}: {out_of_range_summary(arr[bad], np.flatnonzero(bad))}; {DIVERGED_ADVICE}")
    return np.ascontiguousarray(arr.astype(np.float32))


#: What to do about losses :func:`out_of_range` flags (a diverged fine-tune is the usual cause).
DIVERGED_ADVICE = (
    "the fine-tune that produced them diverged: rerun that perturbation with a lower learning rate "
    f"(or fix the loss computation); losses must stay within ±{MAX_ABS_LOSS:g} so that float32 scores cannot overflow"
)


def out_of_range(values: np.ndarray) -> np.ndarray:
    """Mask of the losses a store refuses: NaN, inf, or |loss| > ``MAX_ABS_LOSS`` (see its note in
    ``_constants``). Any shape; ``~(|x| <= B)`` is True for NaN as well."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return np.abs(values.astype(np.float64)) > MAX_ABS_LOSS
    with np.errstate(invalid="ignore"):
        return ~(np.abs(values) <= MAX_ABS_LOSS)


def out_of_range_summary(bad_values: np.ndarray, rows: np.ndarray | list[int] | None = None) -> str:
    """What is wrong with the flagged values (and where: ``rows``), e.g. ``3 losses are NaN, inf or beyond
    ±1e+15 (max |loss| 1e+20; first at rows [2, 7])``."""
    bad_values = np.asarray(bad_values, dtype=np.float64).ravel()
    nan = int(np.isnan(bad_values).sum())
    sizes = np.abs(bad_values[~np.isnan(bad_values)])
    parts = [f"max |loss| {sizes.max():.3g}"] if len(sizes) else []
    parts += [f"{nan} NaN"] if nan else []
    if rows is not None:
        parts.append(f"first at rows {np.asarray(rows)[:5].tolist()}")
    return f"{len(bad_values)} losses are NaN, inf or beyond ±{MAX_ABS_LOSS:g} ({'; '.join(parts)})"


# --- data files of examples (perturb recipes, daunce select, daunce serve) ----------------------------------
#: Data file formats by suffix (in any case).
DATA_FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                     ".parquet": "parquet", ".pq": "parquet"}
ID_FIELD = "id"


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file of examples read by :func:`read_data_file`: its rows in file order and each row's id.

    ``ids``: every row's ``id`` field as a string when the rows have one (``by_id_column``), else the row
    numbers ``"0", "1", ...``; unique either way. ``lines`` (jsonl only): each row's line exactly as the
    file holds it, to write rows back byte for byte. ``table`` (parquet only): the pyarrow table the rows
    were read from, with its schema.
    """

    path: Path
    fmt: str  # jsonl | json | csv | tsv | parquet | dataset (a directory saved by datasets' save_to_disk)
    rows: list[dict[str, Any]]
    ids: list[str]
    by_id_column: bool
    lines: list[bytes] | None = None
    table: Any = None


def data_file_format(path: Path, what: str = "data file", *, dataset_dir: bool = False) -> str:
    """The format of a data file from its suffix (see :data:`DATA_FILE_FORMATS`), or InvalidInputError."""
    fmt = DATA_FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        ext = f"unknown extension {path.suffix!r}" if path.suffix else "no extension"
        also = ", or a directory saved by datasets' save_to_disk" if dataset_dir else ""
        raise InvalidInputError(f"{what} {path}: {ext}; use one of {', '.join(DATA_FILE_FORMATS)}{also}")
    return fmt


def read_data_file(path: str | os.PathLike[str], *, dataset_dir: bool = False) -> DataFile:
    """Read a data file of examples: ``.jsonl``/``.ndjson`` (one JSON object a line), ``.json`` (a list of
    objects), ``.csv``/``.tsv`` (every cell as the text the file holds: ``007`` stays ``007``),
    ``.parquet``/``.pq``, and with ``dataset_dir`` a directory saved by ``datasets.Dataset.save_to_disk``.

    The rows come in file order, with their ids (see :class:`DataFile`). Any problem (no such file, an
    unknown suffix, unreadable or malformed content, no rows, a bad or duplicate id) is one
    InvalidInputError naming the file, and the line of a JSON file or the row.
    """
    path = Path(path)
    lines: list[bytes] | None = None
    table = None
    if dataset_dir and path.is_dir():
        fmt, rows = "dataset", _read_saved_dataset(path)
    else:
        _check_file(path, "data")
        fmt = data_file_format(path, dataset_dir=dataset_dir)
        if fmt == "jsonl":
            lines, rows = _read_jsonl(path)
        elif fmt == "json":
            rows = _read_json(path)
        elif fmt == "parquet":
            table = _read_parquet(path)
            rows = table.to_pylist()
        else:
            frame = read_table(path, as_text=True, layout="a header line, then one example per row",
                               sep="\t" if fmt == "tsv" else ",")
            rows = frame.to_dict(orient="records")
    if not rows:
        raise InvalidInputError(f"data file {path} has no rows")
    ids, by_id_column = _row_ids(rows, path)
    return DataFile(path, fmt, rows, ids, by_id_column, lines, table)


def data_file_specs(specs: Sequence[str], train: str = "train") -> dict[str, str]:
    """``--data`` specs as {set: file}: ``FILE`` is the train data (set ``train``), ``NAME=FILE`` query set
    NAME's; a malformed spec or two files for one set is an InvalidInputError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = train, spec
        if not name or not path:
            raise InvalidInputError(f"--data {spec!r}: give FILE (the train data) or NAME=FILE (query set NAME)")
        if name in out:
            raise InvalidInputError(f"--data: two files for {name!r}; give one per set")
        out[name] = path
    return out


def _row_ids(rows: list[dict[str, Any]], path: Path) -> tuple[list[str], bool]:
    """(ids, by_id_column): every row's ``id`` field as a string when any row has one, else row numbers."""
    if not any(ID_FIELD in row for row in rows):
        return [str(i) for i in range(len(rows))], False
    ids: list[str] = []
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        if ID_FIELD not in row:
            raise InvalidInputError(f"data file {path}: row {i} has no {ID_FIELD!r} field while other rows do; "
                                    "give every row an id, or none")
        value = row[ID_FIELD]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise InvalidInputError(f"data file {path}: row {i}: the {ID_FIELD!r} field is {value!r}; "
                                    "give every row a text or integer id, or drop the field")
        text = str(value)
        if text in first:
            raise InvalidInputError(f"data file {path}: duplicate id {text!r} in rows {first[text]} and {i}; "
                                    "every example needs its own id")
        first[text] = i
        ids.append(text)
    return ids, True


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"data file {path} cannot be read ({_first_line(e)})") from None


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _parse_json(text: bytes, path: Path, line: int | None = None) -> Any:
    """UTF-8 JSON ``text``: line ``line`` of a jsonl file, or (None) a whole .json file."""
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        where = f"data file {path}" + (f": line {line}" if line is not None else "")
        raise InvalidInputError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"data file {path}: line {line or e.lineno} is not valid JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(path: Path) -> tuple[list[bytes], list[dict[str, Any]]]:
    """(raw lines, objects) of the non-blank lines of a jsonl file."""
    lines, rows = [], []
    for number, line in enumerate(_read_bytes(path).splitlines(keepends=True), 1):
        if not line.strip():
            continue
        row = _parse_json(line, path, number)
        if not isinstance(row, dict):
            raise InvalidInputError(f"data file {path}: line {number} is {_json_kind(row)}, not a JSON object "
                                    "with named fields (one example a line)")
        lines.append(line)
        rows.append(row)
    return lines, rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    """The objects of a .json file holding a list of them."""
    rows = _parse_json(_read_bytes(path), path)
    if not isinstance(rows, list):
        raise InvalidInputError(f"data file {path} holds {_json_kind(rows)}; "
                                "a .json data file holds a list of objects, one per example (or use .jsonl, one a line)")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise InvalidInputError(f"data file {path}: element {bad} of its list is {_json_kind(rows[bad])}, "
                                "not a JSON object with named fields")
    return rows


def _read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise _unreadable(path, "parquet", e) from None


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    """The rows of a directory saved by ``datasets.Dataset.save_to_disk``."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(d.name for d in path.iterdir() if d.is_dir())
        raise InvalidInputError(f"{path} holds a DatasetDict (splits {', '.join(splits)}); give one split's directory, e.g. {path / splits[0]}")
    if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        raise InvalidInputError(f"{path} is a directory but not a dataset saved with datasets' save_to_disk")
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(f"{path} is a saved Hugging Face dataset; reading it needs `pip install datasets`") from None
    return datasets.load_from_disk(os.fspath(path)).to_list()


def json_mapping(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``value`` as a dict that JSON can store (records and attributes are JSON), or InvalidInputError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{what} must be a mapping (a dict of JSON values), not {type(value).__name__}")
    try:
        json.dumps(dict(value))
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{what} must hold JSON values only (str, numbers, lists, dicts): {e}") from None
    return dict(value)
