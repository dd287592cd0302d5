"""`daunce select` and `Store.select` on a real store: the removed rows are the store's top opponents
(harmful) or proponents (helpful), the kept rows are written in the data file's own format, and bad
input is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import InvalidInputError, UnknownQuerySetError

from _stores import build_store, make_losses

runner = CliRunner()
N = 60


@pytest.fixture
def store(tmp_path: Path) -> daunce_store.Store:
    train, query = make_losses(N, 4, 10)
    build_store(tmp_path / "s.zarr", train, query)
    return daunce_store.open(tmp_path / "s.zarr", "r")


def _jsonl(path: Path, ids: list[str]) -> Path:
    # Odd spacing and key order: the kept lines must be copied byte for byte.
    path.write_text("".join(f'{{"text": "example {i}",  "id": {json.dumps(i)}}}\n' for i in ids))
    return path


def test_select_writes_the_kept_jsonl_lines_and_removes_the_top_opponents(store, tmp_path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", [f"t{i}" for i in reversed(range(N))])  # file order != store order
    out = runner.invoke(app, ["select", str(tmp_path / "s.zarr"), "--query-set", "test", "--remove", "harmful", "--top", "7",
                              "--data", str(data), "--output", str(tmp_path / "keep.jsonl")])
    assert out.exit_code == 0, out.output
    opponents = store.influence("test", k=7, side="neg")
    removed = {opponents.train_ids[i] for i in opponents.indices["neg"][0]}
    assert (opponents.scores["neg"][0] < 0).all()  # harmful = negative aggregate influence
    lines = data.read_text().splitlines(keepends=True)
    expected = [line for line in lines if json.loads(line)["id"] not in removed]
    assert (tmp_path / "keep.jsonl").read_text().splitlines(keepends=True) == expected
    ids = (tmp_path / "keep.jsonl.ids.txt").read_text().split()
    assert ids == [json.loads(line)["id"] for line in expected]
    assert len(ids) == N - 7


def test_helpful_removes_the_top_proponents_in_rank_order(store, tmp_path) -> None:
    sel = store.select("test", remove="helpful", top=5, write="removed")
    pos = store.influence("test", k=5, side="pos")
    assert list(sel.removed_ids) == [pos.train_ids[i] for i in pos.indices["pos"][0]]
    assert (sel.removed_scores > 0).all() and np.all(np.diff(sel.removed_scores) <= 0)
    frame = sel.to_pandas()
    assert list(frame["train_id"]) == list(sel.removed_ids) and list(frame["rank"]) == [1, 2, 3, 4, 5]


def test_csv_without_an_id_column_is_matched_by_row_number(tmp_path) -> None:
    train, query = make_losses(N, 3, 8)
    s = daunce_store.init(tmp_path / "rows.zarr", [str(i) for i in range(N)], {"test": ["a", "b", "c"]})
    for c in range(8):
        s.append(f"p{c}", train[:, c], {"test": query[:, c]})
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(N)], "code": [f"{i:03d}" for i in range(N)]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    sel = s.select("test", remove="harmful", top=4, write="removed", data=tmp_path / "train.csv", output=tmp_path / "bad.csv")
    written = pd.read_csv(tmp_path / "bad.csv", dtype=str)
    assert list(written["text"]) == [f"row {i}" for i in sel.removed_index]
    assert list(written["code"]) == [f"{i:03d}" for i in sel.removed_index]  # 007 stays 007
    assert list(sel.to_pandas()["text"]) == list(written["text"])


def test_parquet_with_integer_ids_keeps_its_schema(tmp_path) -> None:
    train, query = make_losses(N, 3, 8)
    s = daunce_store.init(tmp_path / "int.zarr", [str(100 + i) for i in range(N)], {"test": ["a", "b", "c"]})
    for c in range(8):
        s.append(f"p{c}", train[:, c], {"test": query[:, c]})
    table = pa.table({"id": pa.array(range(100, 100 + N), pa.int32()), "x": pa.array(np.arange(N, dtype=np.float32))})
    pq.write_table(table, tmp_path / "train.parquet")
    sel = s.select("test", remove="helpful", top=10, data=tmp_path / "train.parquet", output=tmp_path / "keep.parquet",
                   ids_output=tmp_path / "kept.txt")
    kept = pq.read_table(tmp_path / "keep.parquet")
    assert kept.schema == table.schema and kept.num_rows == N - 10
    assert [str(v) for v in kept.column("id").to_pylist()] == (tmp_path / "kept.txt").read_text().split()
    assert not set(sel.removed_ids) & {str(v) for v in kept.column("id").to_pylist()}


@pytest.mark.parametrize("case, message", [
    ("ids", "does not match the store's 60 train ids by its 'id' column: 1 store train ids are not in it"),
    ("rows", "by row numbers 0..N-1 (it has no 'id' column)"),
    ("top", "top=60 would remove all 60 training examples"),
    ("query", "query set"),
    ("format", "unknown extension '.xlsx'"),
    ("same", "is the data file itself"),
    ("mixed", "rows are written in the data file's own format"),
])
def test_bad_input_is_refused_before_anything_is_written(store, tmp_path, case, message) -> None:
    data = _jsonl(tmp_path / "train.jsonl", [f"t{i}" for i in range(N)])
    output = tmp_path / "keep.jsonl"
    args = dict(query_set="test", top=5, data=data, output=output)
    if case == "ids":
        _jsonl(data, [f"t{i}" for i in range(N - 1)] + ["stranger"])
    elif case == "rows":
        data.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(N)))
    elif case == "top":
        args["top"] = N
    elif case == "query":
        args["query_set"] = "nope"
    elif case == "format":
        args["output"] = tmp_path / "keep.xlsx"
    elif case == "same":
        args["output"] = data
    elif case == "mixed":
        args["output"] = tmp_path / "keep.csv"
    before = data.read_bytes()
    with pytest.raises((InvalidInputError, UnknownQuerySetError), match=message.replace("(", r"\(").replace(")", r"\)")):
        store.select(**args)
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "train.jsonl"]


def test_cli_errors_are_one_line(store, tmp_path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", [f"t{i}" for i in range(N)])
    out = runner.invoke(app, ["select", str(tmp_path / "s.zarr"), "--query-set", "test", "--top", "500",
                              "--data", str(data), "--output", str(tmp_path / "k.jsonl")])
    assert out.exit_code == 2
    assert out.output.strip().count("\n") == 0 and "top=500" in out.output
