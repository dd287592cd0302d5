"""The one reader of data files of examples (``daunce_store.store.read_data_file``), shared by the perturb
recipes, ``daunce select`` and ``daunce serve``: formats, ids, and one clear error for each bad file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daunce_store.errors import InvalidInputError
from daunce_store.store import read_data_file


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _refused(path: Path, *expected: str, **kwargs: object) -> str:
    with pytest.raises(InvalidInputError) as info:
        read_data_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for text in expected:
        assert text in message, message
    return message


def test_jsonl_with_ids_keeps_its_raw_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    raw = b'{"id": "a", "text": "x"}\n\n{"text": "y",   "id": 7}\r\n{"id": "c", "text": "\xc3\xa9"}'
    path.write_bytes(raw)
    data = read_data_file(path)
    assert data.fmt == "jsonl" and data.by_id_column
    assert data.ids == ["a", "7", "c"]
    assert data.rows == [{"id": "a", "text": "x"}, {"text": "y", "id": 7}, {"id": "c", "text": "é"}]
    assert data.lines == [b'{"id": "a", "text": "x"}\n', b'{"text": "y",   "id": 7}\r\n', b'{"id": "c", "text": "\xc3\xa9"}']


def test_jsonl_without_ids_numbers_the_rows(tmp_path):
    data = read_data_file(_jsonl(tmp_path / "train.ndjson", [{"text": t} for t in "xyz"]))
    assert data.fmt == "jsonl" and not data.by_id_column
    assert data.ids == ["0", "1", "2"] and [r["text"] for r in data.rows] == ["x", "y", "z"]


def test_csv_cells_are_text(tmp_path):
    path = tmp_path / "train.CSV"
    path.write_text("id,text,label\n007,hello,1\nNA,,0\n")
    data = read_data_file(path)
    assert data.fmt == "csv" and data.ids == ["007", "NA"]
    assert data.rows == [{"id": "007", "text": "hello", "label": "1"}, {"id": "NA", "text": "", "label": "0"}]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("text\tlabel\na, b\t1\n")
    assert read_data_file(tsv).rows == [{"text": "a, b", "label": "1"}]


def test_parquet_keeps_its_table(tmp_path):
    table = pa.table({"id": pa.array([10, 11, 12], pa.int32()), "pixels": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]})
    pq.write_table(table, tmp_path / "train.parquet")
    data = read_data_file(tmp_path / "train.parquet")
    assert data.fmt == "parquet" and data.ids == ["10", "11", "12"]
    assert data.rows[1] == {"id": 11, "pixels": [2.0, 3.0]}
    assert data.table.schema == table.schema


def test_json_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": "q1", "text": "a"}, {"id": "q2", "text": "b"}], indent=2))
    data = read_data_file(path)
    assert data.fmt == "json" and data.ids == ["q1", "q2"] and data.rows[1]["text"] == "b" and data.lines is None


def test_bad_ids_name_the_row(tmp_path):
    rows = [{"id": "a"}, {"id": "b"}, {"text": "no id"}, {"id": "d"}]
    _refused(_jsonl(tmp_path / "missing.jsonl", rows), "row 2 has no 'id' field while other rows do")
    rows[2] = {"id": None}
    _refused(_jsonl(tmp_path / "null.jsonl", rows), "row 2: the 'id' field is None")
    rows[2] = {"id": 1.5}
    _refused(_jsonl(tmp_path / "float.jsonl", rows), "row 2: the 'id' field is 1.5")
    rows[2] = {"id": "a"}
    _refused(_jsonl(tmp_path / "dup.jsonl", rows), "duplicate id 'a' in rows 0 and 2")
    (tmp_path / "blank.csv").write_text("id,text\nx,1\n ,2\n")
    _refused(tmp_path / "blank.csv", "row 1: the 'id' field is ' '")


def test_malformed_content_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    _refused(path, "line 3 is not valid JSON")
    path.write_text('{"text": "a"}\n["b"]\n')
    _refused(path, "line 2 is a list, not a JSON object")
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    _refused(path, "line 2 is not UTF-8 text")
    whole = tmp_path / "bad.json"
    whole.write_text('[\n  {"text": "a"},\n  {"text": \n]\n')
    _refused(whole, "line 4 is not valid JSON")
    whole.write_text('{"text": "a"}')
    _refused(whole, "holds an object", "a list of objects")
    whole.write_text('[{"text": "a"}, 3]')
    _refused(whole, "element 1 of its list is a number")
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet at all")
    _refused(garbage, "is not a readable parquet file")


@pytest.mark.parametrize("name, content, expected", [
    ("train.xlsx", "x", ("unknown extension '.xlsx'", ".jsonl", ".csv", ".parquet")),
    ("train", "x", ("no extension",)),
    ("nope.jsonl", None, ("data file", "does not exist")),
    ("empty.jsonl", "", ("is empty (0 bytes)",)),
    ("blank.jsonl", "\n\n", ("has no rows",)),
    ("empty.json", "[]", ("has no rows",)),
    ("header.csv", "id,text\n", ("has no rows",)),
])
def test_unknown_suffix_missing_and_empty_files(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    _refused(path, *expected)


def test_directories(tmp_path):
    _refused(tmp_path, "is a directory; give the file itself")
    _refused(tmp_path, "is a directory but not a dataset saved with datasets' save_to_disk", dataset_dir=True)
    (tmp_path / "train.xlsx").write_text("x")
    _refused(tmp_path / "train.xlsx", "or a directory saved by datasets' save_to_disk", dataset_dir=True)


def test_the_store_imports_without_pandas():
    code = "import sys, daunce_store.store; assert 'pandas' not in sys.modules and 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"id": "r1", "text": "a"}, {"id": "r2", "text": "b"}]).save_to_disk(tmp_path / "ds")
    data = read_data_file(tmp_path / "ds", dataset_dir=True)
    assert data.fmt == "dataset" and data.ids == ["r1", "r2"] and data.rows[1] == {"id": "r2", "text": "b"}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(tmp_path / "dd")
    _refused(tmp_path / "dd", "holds a DatasetDict (splits train)", dataset_dir=True)
