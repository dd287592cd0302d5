"""Bad input through the real ``daunce`` entry point: exit code 2, a message that says what is wrong,
and the store unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from daunce_store.cli import app

runner = CliRunner()
N = 20


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text("\n".join(f"t{i}" for i in range(N)) + "\n")
    (tmp_path / "test.txt").write_text("q0\nq1\n")
    path = tmp_path / "s.zarr"
    result = runner.invoke(app, ["init", str(path), "--train-ids", str(tmp_path / "train.txt"), "--query-set", f"test={tmp_path / 'test.txt'}", "--chunk-rows", "8"])
    assert result.exit_code == 0, result.output
    for k in range(2):
        np.save(tmp_path / f"l{k}.npy", np.random.default_rng(k).random(N))
        np.save(tmp_path / f"q{k}.npy", np.random.default_rng(k + 10).random(2))
        result = runner.invoke(app, ["append", str(path), "--perturbation", f"p{k}", "--train", str(tmp_path / f"l{k}.npy"), "--query", f"test={tmp_path / f'q{k}.npy'}"])
        assert result.exit_code == 0, result.output
    return path


def _refused(store: Path, args: list[str], match: str) -> None:
    before = _files(store)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split()), result.output  # rich wraps long lines
    assert "Traceback" not in result.output
    assert _files(store) == before


def test_nan_losses(store: Path, tmp_path: Path) -> None:
    values = np.ones(N)
    values[4] = np.nan
    np.save(tmp_path / "nan.npy", values)
    _refused(store, ["append", str(store), "--perturbation", "p9", "--train", str(tmp_path / "nan.npy")], "NaN, inf or beyond")


def test_wrong_length(store: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "short.npy", np.ones(N - 1))
    _refused(store, ["append", str(store), "--perturbation", "p9", "--train", str(tmp_path / "short.npy")], f"expected {N} losses")


def test_strings_in_csv(store: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("loss\n" + "\n".join(["1.0"] * (N - 1) + ["oops"]) + "\n")
    _refused(store, ["append", str(store), "--perturbation", "p9", "--train", str(tmp_path / "bad.csv")], "losses must be numbers")


def test_same_perturbation_twice(store: Path, tmp_path: Path) -> None:
    _refused(store, ["append", str(store), "--perturbation", "p1", "--train", str(tmp_path / "l0.npy")], "already committed")


def test_unknown_query_set(store: Path, tmp_path: Path) -> None:
    args = ["append", str(store), "--perturbation", "p9", "--train", str(tmp_path / "l0.npy"), "--query", f"tset={tmp_path / 'q0.npy'}"]
    _refused(store, args, "unknown query set 'tset'")
    _refused(store, ["topk", str(store), "--query-set", "tset"], "unknown query set 'tset'")


def test_unknown_query_id_and_bad_k(store: Path) -> None:
    _refused(store, ["topk", str(store), "--query-set", "test", "--query", "q7"], "'q7' is not in the query set")
    _refused(store, ["topk", str(store), "--query-set", "test", "-k", "0"], ">= 1")
    _refused(store, ["topk", str(store), "--query-set", "test", "-k", str(N + 1)], "larger than the training set")


def test_bad_query_set_name(store: Path, tmp_path: Path) -> None:
    _refused(store, ["add-queries", str(store), "--query-set", f"bad-name={tmp_path / 'test.txt'}"], "not a plain identifier")


def test_duplicate_ids_at_init(tmp_path: Path) -> None:
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    result = runner.invoke(app, ["init", str(tmp_path / "new.zarr"), "--train-ids", str(tmp_path / "dup.txt")])
    assert result.exit_code == 2 and "duplicate ids" in result.output
    assert not (tmp_path / "new.zarr").exists()


def test_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hi")
    for target, match in [(tmp_path / "empty", "nothing there"), (tmp_path / "file.txt", "is a file")]:
        result = runner.invoke(app, ["status", str(target)])
        assert result.exit_code == 2, result.output
        assert match in result.output and "Traceback" not in result.output
