"""Ids are plain text in everything ``daunce`` prints: rich reads a str as markup, so an id ``[b]t1`` printed
raw shows as ``t1`` and one holding ``[/]`` raises MarkupError. Driven through the real entry point."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store import cli
from daunce_store.cli import app

runner = CliRunner()
TRAIN = ["[b]t1", "x[/]y", "[red]", "t3", "t4", "a\\", "[bold red]z[/bold red]"]
QUERIES = ["q[/]1", "[b]q2", "[red]"]
WORKER = "w[/]x"


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide consoles, so that no table cell is cut short at 80 columns."""
    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    return result.output


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store made by `daunce init` from id files full of markup, with four committed columns and a lease."""
    (tmp_path / "train.txt").write_text("\n".join(TRAIN) + "\n", encoding="utf-8")
    (tmp_path / "queries.txt").write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    path = tmp_path / "s.zarr"
    out = _ok(["init", str(path), "--train-ids", str(tmp_path / "train.txt"), "--query-set", f"test={tmp_path / 'queries.txt'}"])
    assert "n_train=7" in out
    s = daunce_store.open(path)
    assert s.train_ids.tolist() == TRAIN and s.query_ids("test").tolist() == QUERIES
    rng = np.random.default_rng(0)
    for k in range(4):
        s.append(f"p{k}", rng.standard_normal(len(TRAIN)).astype(np.float32),
                 {"test": rng.standard_normal(len(QUERIES)).astype(np.float32)})
    s.claim("p9", worker=WORKER)
    return path


def _cells(output: str) -> set[str]:
    """The cells of the tables in ``output``, stripped."""
    return {cell.strip() for line in output.splitlines() for cell in line.split("│")[1:-1]}


def test_topk_prints_ids_as_they_are(store: Path) -> None:
    cells = _cells(_ok(["topk", str(store), "--query-set", "test", "-k", str(len(TRAIN))]))
    assert set(TRAIN) <= cells and set(QUERIES) <= cells


def test_influence_prints_ids_as_they_are(store: Path) -> None:
    cells = _cells(_ok(["influence", str(store), "--query-set", "test", "-k", str(len(TRAIN))]))
    assert set(TRAIN) <= cells


def test_self_influence_prints_ids_as_they_are(store: Path) -> None:
    cells = _cells(_ok(["self-influence", str(store), "-k", str(len(TRAIN)), "--side", "both"]))
    assert set(TRAIN) <= cells


def test_select_and_stability_print_ids_as_they_are(store: Path) -> None:
    removed = _cells(_ok(["select", str(store), "--query-set", "test", "--top", str(len(TRAIN) - 1)])) & set(TRAIN)
    assert len(removed) == len(TRAIN) - 1  # all but one, each printed as it is
    cells = _cells(_ok(["stability", str(store), "--query-set", "test", "-k", "2", "--bootstrap", "2"]))
    assert set(QUERIES) <= cells


def test_status_and_leases_print_user_text_as_it_is(store: Path) -> None:
    assert WORKER in _ok(["status", str(store)])  # the lease record, with its worker name, is in the table
    assert WORKER in _cells(_ok(["leases", str(store)]))


@pytest.mark.parametrize("bad", ["nope[/]", "[b]nope", "[red]nope"])
def test_an_error_naming_a_bad_id_prints_it_as_it_is(store: Path, bad: str) -> None:
    result = runner.invoke(app, ["topk", str(store), "--query-set", "test", "--query", bad, "-k", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    assert f"error: id {bad!r} is not in the query set 'test'" in " ".join(result.output.split())


def test_an_init_error_naming_ids_prints_them_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("x[/]y\n[b]t1\nx[/]y\n", encoding="utf-8")
    result = runner.invoke(app, ["init", str(tmp_path / "s.zarr"), "--train-ids", str(tmp_path / "train.txt")])
    assert result.exit_code == 2, result.output
    assert "duplicate ids ['x[/]y']" in result.output and "Traceback" not in result.output


def test_lookalike_ids_warn_on_one_line_naming_both(tmp_path: Path) -> None:
    """Ids that differ only in Unicode normalisation are kept, with one warning line naming both forms."""
    nfc, nfd = unicodedata.normalize("NFC", "[b]café"), unicodedata.normalize("NFD", "[b]café")
    assert nfc != nfd
    (tmp_path / "train.txt").write_text(f"{nfc}\nt1\n{nfd}\n", encoding="utf-8")
    (tmp_path / "q.txt").write_text("q0\n", encoding="utf-8")
    path = tmp_path / "s.zarr"
    out = _ok(["init", str(path), "--train-ids", str(tmp_path / "train.txt")])
    lines = [line for line in out.splitlines() if "IdNormalizationWarning" in line]
    assert len(lines) == 1, out  # once: not again for the file and for the store
    assert lines[0].startswith("warning (IdNormalizationWarning): train ids:")
    assert f"{nfc!r} (row 0, NFC) and {nfd!r} (row 2, NFD)" in lines[0]
    assert daunce_store.open(path).train_ids.tolist() == [nfc, "t1", nfd]  # kept as given, distinct
    (tmp_path / "q2.txt").write_text(f"{nfd}\n{nfc}\n", encoding="utf-8")
    out = _ok(["add-queries", str(path), "--query-set", f"more={tmp_path / 'q2.txt'}"])
    assert "warning (IdNormalizationWarning): query set 'more' ids:" in out
