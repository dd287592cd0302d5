"""``daunce init / add-queries / append / status / export`` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app

runner = CliRunner()
N, M, K = 30, 3, 4


def _losses(k: int, n: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([k, n, salt]).standard_normal(n).astype(np.float32)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text("\n".join(f"t{i}" for i in range(N)) + "\n")
    pd.DataFrame({"qid": [f"q{j}" for j in range(M)]}).to_csv(tmp_path / "test.csv", index=False)
    path = tmp_path / "s.zarr"
    result = runner.invoke(app, ["init", str(path), "--train-ids", str(tmp_path / "train.txt"), "--query-set", f"test={tmp_path / 'test.csv'}:qid", "--chunk-rows", "8"])
    assert result.exit_code == 0, result.output
    for k in range(K):
        np.save(tmp_path / f"l{k}.npy", _losses(k, N))
        pd.DataFrame({"loss": _losses(k, M, 1)}).to_parquet(tmp_path / f"q{k}.parquet")
        args = ["append", str(path), "--perturbation", f"p{k}", "--train", str(tmp_path / f"l{k}.npy"), "--query", f"test={tmp_path / f'q{k}.parquet'}", "--metadata", json.dumps({"seed": k})]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"committed 'p{k}'" in result.output
    return path


def test_status_json(store: Path) -> None:
    daunce_store.open(store).claim("p9", worker="w1")
    result = runner.invoke(app, ["status", str(store), "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["n_train"] == N and info["committed_columns"] == K
    assert info["query_sets"] == {"test": {"m": M, "columns": K}}
    assert info["leases_in_flight"] == 1 and info["leases"][0]["perturbation"] == "p9" and info["leases"][0]["worker"] == "w1"
    assert info["format_version"] == 1
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert info["size_bytes"] == on_disk


def test_status_table(store: Path) -> None:
    result = runner.invoke(app, ["status", str(store)])
    assert result.exit_code == 0, result.output
    for word in ("n_train", "committed_columns", "leases_in_flight", "size_bytes", "format_version"):
        assert word in result.output
    assert runner.invoke(app, ["status", str(store), "--format", "csv"]).exit_code == 2  # not a choice


def test_add_queries_then_status(store: Path, tmp_path: Path) -> None:
    (tmp_path / "late.txt").write_text("a\nb\n")
    result = runner.invoke(app, ["add-queries", str(store), "--query-set", f"late={tmp_path / 'late.txt'}"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["status", str(store), "--format", "json"]).stdout)
    assert info["query_sets"]["late"] == {"m": 2, "columns": 0}


def test_installed_script_status(store: Path) -> None:
    script = Path(sys.executable).with_name("daunce")
    assert script.exists(), "the `daunce` entry point is not installed in this environment"
    out = subprocess.run([str(script), "status", str(store), "--format", "json"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["committed_columns"] == K
    bad = subprocess.run([str(script), "status", str(store.parent / "nope")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing there" in " ".join(bad.stderr.split()) and "Traceback" not in bad.stderr


def _expected_wide() -> pd.DataFrame:
    rows = [{"set": "train", "id": f"t{i}", **{f"p{k}": _losses(k, N)[i] for k in range(K)}} for i in range(N)]
    rows += [{"set": "test", "id": f"q{j}", **{f"p{k}": _losses(k, M, 1)[j] for k in range(K)}} for j in range(M)]
    return pd.DataFrame(rows).astype({f"p{k}": "float32" for k in range(K)})


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_export_wide(store: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"losses.{suffix}"
    result = runner.invoke(app, ["export", str(store), "--output", str(out)])
    assert result.exit_code == 0, result.output
    got = {"parquet": pd.read_parquet, "csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](out)
    want = _expected_wide()
    assert list(got.columns) == ["set", "id"] + [f"p{k}" for k in range(K)]
    assert got[["set", "id"]].values.tolist() == want[["set", "id"]].values.tolist()
    values = got[[f"p{k}" for k in range(K)]].to_numpy(np.float64)
    if suffix == "parquet":  # float32 kept exactly
        assert got["p0"].dtype == np.float32
        np.testing.assert_array_equal(values, want[[f"p{k}" for k in range(K)]].to_numpy(np.float64))
    else:  # text round-trips float32 to ~7 digits
        np.testing.assert_allclose(values, want[[f"p{k}" for k in range(K)]].to_numpy(np.float64), rtol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_export_long_and_missing_query_columns(store: Path, tmp_path: Path) -> None:
    s = daunce_store.open(store)
    s.append("extra", _losses(9, N))  # no query losses for this one
    wide = s.to_pandas()
    assert wide.loc[wide["set"] == "test", "extra"].isna().all()
    assert wide.loc[wide["set"] == "train", "extra"].to_numpy().tolist() == _losses(9, N).tolist()
    out = tmp_path / "long.parquet"
    result = runner.invoke(app, ["export", str(store), "-o", str(out), "--form", "long"])
    assert result.exit_code == 0, result.output
    long = pd.read_parquet(out)
    assert list(long.columns) == ["set", "id", "perturbation", "loss"]
    assert len(long) == N * (K + 1) + M * K  # the query set has no row for 'extra'
    pivot = long.pivot_table(index=["set", "id"], columns="perturbation", values="loss", sort=False)
    np.testing.assert_array_equal(pivot.loc["train"].loc[[f"t{i}" for i in range(N)], "p2"].to_numpy(), _losses(2, N))


def test_export_bad_suffix_writes_nothing(store: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(store), "-o", str(tmp_path / "out.xlsx")])
    assert result.exit_code == 2 and "use a .parquet, .csv or .jsonl" in result.output
    assert not (tmp_path / "out.xlsx").exists()


def test_compact(store: Path) -> None:
    s = daunce_store.open(store)
    before = s.train_losses()
    for k in range(K, 64):
        s.append(f"p{k}", _losses(k, N), {"test": _losses(k, M, 1)})
    result = runner.invoke(app, ["compact", str(store)])
    assert result.exit_code == 0, result.output
    assert "packed 1 new group(s) of 64 columns; 64 of 64" in " ".join(result.output.split())
    assert (store / "train" / "packed" / "c").exists()
    np.testing.assert_array_equal(daunce_store.open(store, mode="r").train_losses()[:, :K], before)
    info = json.loads(runner.invoke(app, ["status", str(store), "--format", "json"]).stdout)
    assert info["packed_columns"] == 64


def test_export_into_missing_folder(store: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(store), "-o", str(tmp_path / "nope" / "out.csv")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split()) and "Traceback" not in result.output
