"""Text beside ids: `--data` on `topk`, `influence` and `self-influence` shows each listed example's content in
the table (shortened) and adds its columns, whole, to json/jsonl/csv/parquet; `--format json` is the server's
envelope. Rows are matched by the file's `id` column, else by row number (the rule of `select`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app

from _stores import build_store, make_losses

runner = CliRunner()
N, M, K = 40, 3, 8
LONG = "word " * 40  # longer than a table cell


@pytest.fixture
def store(tmp_path: Path) -> Path:
    train, query = make_losses(N, M, K)
    build_store(tmp_path / "s.zarr", train, query)  # train ids t0.., query ids q0..
    return tmp_path / "s.zarr"


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    # Reversed order: rows are matched by id, not by position.
    rows = [{"id": f"t{i}", "prompt": f"prompt of t{i} {LONG}", "answer": f"answer {i}", "tags": [i, "x"]} for i in reversed(range(N))]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def query_file(tmp_path: Path) -> Path:
    path = tmp_path / "queries.csv"
    pd.DataFrame({"id": [f"q{j}" for j in range(M)], "question": [f"question {j}" for j in range(M)]}).to_csv(path, index=False)
    return path


def _run(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


def _refused(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:") and "Traceback" not in text, result.output
    return text


def test_topk_json_is_the_envelope_with_train_and_query_text(store, train_file, query_file):
    out = json.loads(_run("topk", store, "--query-set", "test", "-k", 3, "--measure", "cov",
                          "--data", train_file, "--data", f"test={query_file}", "--format", "json"))
    assert set(out) == {"measure", "num_columns", "records"} and out["measure"] == "cov" and out["num_columns"] == K
    plain = daunce_store.open(store, "r").topk("test", k=3, measure="cov").records()
    assert len(out["records"]) == len(plain) == M * 2 * 3
    for rec, bare in zip(out["records"], plain):
        assert {k: rec[k] for k in bare} == bare  # the ranking itself is unchanged
        i = int(rec["train_id"][1:])
        assert rec["train_prompt"] == f"prompt of t{i} {LONG}"  # whole, not shortened
        assert rec["train_answer"] == f"answer {i}" and rec["train_tags"] == [i, "x"]
        assert rec["query_question"] == f"question {int(rec['query'][1:])}"


def test_table_shows_shortened_text_and_each_query_once(store, train_file, query_file, monkeypatch):
    from daunce_store import cli

    monkeypatch.setattr(cli.console, "width", 300)  # a wide terminal: each cell on one line
    result = runner.invoke(app, ["topk", str(store), "--query-set", "test", "--query", "q1", "-k", "2", "--measure", "cov",
                                 "--data", str(train_file), "--data", f"test={query_file}"])
    assert result.exit_code == 0, result.output
    top = daunce_store.open(store, "r").topk("test", ["q1"], k=2, measure="cov")
    for rec in top.records():
        assert f"prompt of {rec['train_id']} word word" in result.stdout and f"answer {rec['train_id'][1:]}" in result.stdout
    assert LONG.strip() not in result.stdout and "…" in result.stdout  # shortened in the table
    assert result.stdout.count("question 1") == 1  # the query's text on its first row only


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_files_carry_the_text_columns(store, train_file, tmp_path, fmt):
    out = tmp_path / f"inf.{fmt}"
    _run("influence", store, "--query-set", "test", "-k", 4, "--data", train_file, "--format", fmt, "-o", out)
    frame = pd.read_json(out, lines=True, dtype={"train_id": str}) if fmt == "jsonl" else \
        pd.read_csv(out, dtype={"train_id": str}) if fmt == "csv" else pd.read_parquet(out)
    assert len(frame) == 2 * 4
    for _, rec in frame.iterrows():
        i = int(rec["train_id"][1:])
        assert rec["train_prompt"] == f"prompt of t{i} {LONG}"
        tags = rec["train_tags"] if fmt == "jsonl" else json.loads(rec["train_tags"])  # a list as JSON text in a table
        assert list(tags) == [i, "x"]


def test_self_influence_with_row_number_ids(tmp_path):
    """A data file without an id column is matched by row number, as `select` matches it."""
    train, query = make_losses(N, M, K)
    s = daunce_store.init(tmp_path / "r.zarr", [str(i) for i in range(N)], {"test": [f"q{j}" for j in range(M)]})
    for c in range(K):
        s.append(f"p{c}", train[:, c], {"test": query[:, c]})
    data = tmp_path / "train.csv"
    pd.DataFrame({"text": [f"line {i}" for i in range(N)]}).to_csv(data, index=False)
    out = json.loads(_run("self-influence", tmp_path / "r.zarr", "-k", 5, "--data", data, "--format", "json"))
    assert len(out["records"]) == 5
    assert all(r["train_text"] == f"line {r['train_id']}" for r in out["records"])


def test_bad_data_is_one_clear_line(store, train_file, query_file, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"id": f"t{i}", "prompt": "p"}) + "\n" for i in range(5)))
    text = _refused("topk", store, "--query-set", "test", "-k", 10, "--measure", "cov", "--data", short)
    assert "not in the data file" in text and "'id' column" in text
    text = _refused("self-influence", store, "--data", f"test={query_file}")
    assert "train examples only" in text
    text = _refused("topk", store, "--query-set", "test", "--data", f"other={query_file}")
    assert "only test=FILE" in text
    text = _refused("topk", store, "--query-set", "test", "--data", tmp_path / "missing.jsonl")
    assert "missing.jsonl" in text


def test_a_store_no_recipe_made_remembers_no_files(store):
    s = daunce_store.open(store, "r")
    assert s.recipe_config() is None and s.data_files() == {}
    out = json.loads(_run("topk", store, "--query-set", "test", "-k", 2, "--format", "json"))
    assert set(out["records"][0]) == {"query", "side", "rank", "train_id", "train_index", "score"}
