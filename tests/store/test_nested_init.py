"""``init`` inside an existing store is refused, on every backend, and the outer store stays a store: before,
``init S/sub`` wrote a group into S's hierarchy and S then failed to open (``KeyError: 'ids'``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import Location, assert_consistent, fill
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import StoreExistsError

runner = CliRunner()
N = 12


@pytest.fixture
def outer(location: Location) -> daunce_store.LossStore:
    s = location.init("S", [f"t{i}" for i in range(N)], {"test": ["q0", "q1"]}, chunk_rows=8)
    fill(s, range(3))
    return s


@pytest.mark.parametrize("inner", ["S/sub", "S/train", "S/queries/more", "S/train/ids/deeper", "S/a/b/c"])
def test_init_inside_a_store_is_refused(location: Location, outer: daunce_store.LossStore, inner: str) -> None:
    before = location.objects("S")
    with pytest.raises(StoreExistsError, match=r"is inside the daunce store .*S; a store cannot hold another store"):
        location.init(inner, ["a", "b"])
    assert location.objects("S") == before  # nothing written
    reopened = location.open("S", mode="r")
    assert reopened.verify(progress=False).ok
    assert reopened.query_sets() == {"test": 2} and assert_consistent(reopened) == [0, 1, 2]


def test_a_sibling_and_a_lookalike_prefix_are_fine(location: Location, outer: daunce_store.LossStore) -> None:
    location.init("S2", ["a", "b"])  # S2 shares the prefix "S" as text, not as a folder
    location.init("other/inner", ["a", "b"])
    assert location.open("S", mode="r").verify(progress=False).ok


def test_a_foreign_zarr_group_above_is_not_a_store(tmp_path: Path) -> None:
    """Only a daunce store's root counts: a zarr.json of something else (or a damaged one) does not refuse."""
    (tmp_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "zarr.json").write_text("{not json")
    daunce_store.init(tmp_path / "d" / "s", ["a", "b"])


def test_daunce_init_inside_a_store(tmp_path: Path) -> None:
    """Through the CLI: exit 2 with the message, and `daunce verify` of the outer store still passes."""
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    assert runner.invoke(app, ["init", str(tmp_path / "S"), "--train-ids", str(tmp_path / "ids.txt")]).exit_code == 0
    for inner in ("S/sub", "S/train"):
        result = runner.invoke(app, ["init", str(tmp_path / inner), "--train-ids", str(tmp_path / "ids.txt")])
        assert result.exit_code == 2, result.output
        assert "is inside the daunce store" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "S" / "sub").exists()
    result = runner.invoke(app, ["verify", str(tmp_path / "S"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["status", str(tmp_path / "S")]).exit_code == 0
