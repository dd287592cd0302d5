"""The drift share (daunce_store.scoring.drift_share, `daunce stability`) on real stores whose columns are a
known common shift plus independent noise around theta0's losses, and on stores whose commits do not
record the loss change (made before it existed, or appended by hand): "unknown", not an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import InvalidInputError
from daunce_store.scoring import drift_share

from _stores import build_store, make_losses

N, M, K = 400, 5, 16
runner = CliRunner()


def _drifting_store(path: Path, shift_scale: float, noise_scale: float = 1.0, seed: int = 0):
    """Columns L_k = L0 + s + e_k: one shift s shared by every column, noise e_k of its own; each commit
    records its ||L_k - L0||^2 as the runner does. Returns the store and the change matrix D (n, K)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 2.0, N)
    shift = shift_scale * rng.standard_normal(N)
    d = shift[:, None] + noise_scale * rng.standard_normal((N, K))
    train = (base[:, None] + d).astype(np.float32)
    d = train.astype(np.float64) - base[:, None]  # the change as stored (float32 columns)
    query = rng.standard_normal((M, K)).astype(np.float32)
    store = daunce_store.init(path, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=64)
    for k in range(K):
        rec = {"sum_sq": float(d[:, k] @ d[:, k]), "mean": float(d[:, k].mean()), "rows": N}
        store.append(f"p{k}", train[:, k], {"test": query[:, k]}, metadata={"train_change": rec, "l2_center": "zero"})
    return store, d


@pytest.mark.parametrize("shift_scale", [0.0, 1.0, 3.0])
def test_drift_share_is_the_common_part_of_the_change(tmp_path: Path, shift_scale: float) -> None:
    store, d = _drifting_store(tmp_path / "s.zarr", shift_scale)
    # The definition, from the change matrix itself: K ||mean_k d_k||^2 / ||D||^2.
    exact = K * float(np.sum(d.mean(axis=1) ** 2)) / float(np.sum(d * d))
    got = drift_share(store)
    assert got == pytest.approx(exact, abs=1e-6)
    # In expectation, with ||s||^2 = n a^2 and noise of unit variance: (K a^2 + 1) / (K a^2 + K).
    expected = (K * shift_scale**2 + 1) / (K * shift_scale**2 + K)
    assert got == pytest.approx(expected, abs=0.03)
    # A subset of the columns: the same definition on those columns.
    cols = [0, 3, 5, 9]
    sub = d[:, cols]
    assert drift_share(store, columns=cols) == pytest.approx(len(cols) * np.sum(sub.mean(axis=1) ** 2) / np.sum(sub * sub), abs=1e-6)
    st = store.stability("test", k=3, bootstrap=0)
    assert st.drift_share == pytest.approx(got, abs=1e-9) and st.l2_center == "zero"


def test_drift_share_reads_through_compaction_and_small_blocks(tmp_path: Path) -> None:
    store, d = _drifting_store(tmp_path / "s.zarr", 1.0)
    before = drift_share(store)
    store.compact()
    assert drift_share(daunce_store.open(store.url)) == pytest.approx(before, abs=1e-9)
    assert store.stability("test", k=3, bootstrap=0, block_rows=7).drift_share == pytest.approx(before, abs=1e-9)


def test_stores_without_the_record_say_unknown(tmp_path: Path) -> None:
    train, query = make_losses(60, M, 6)
    old = build_store(tmp_path / "old.zarr", train, query)  # metadata {"seed": c}: no train_change, no l2_center
    assert drift_share(old) is None
    st = old.stability("test", k=3, bootstrap=0)
    assert st.drift_share is None and st.l2_center is None
    got = runner.invoke(app, ["stability", old.url, "--query-set", "test", "-k", "3", "--bootstrap", "0", "--format", "json"])
    assert got.exit_code == 0, got.output
    body = json.loads(got.stdout)
    assert body["drift_share"] is None and body["l2_center"] is None
    table = runner.invoke(app, ["stability", old.url, "--query-set", "test", "-k", "3", "--bootstrap", "0"])
    text = " ".join(table.stdout.split())
    assert table.exit_code == 0 and "drift share unknown" in text and "L2 centre unknown" in text

    # One column without the record among recorded ones: unknown too; columns of two centres: "mixed".
    store, _ = _drifting_store(tmp_path / "mixed.zarr", 1.0)
    store.append("extra", np.ones(N, np.float32), {"test": query[:, 0]},
                 metadata={"l2_center": "theta0"})
    assert drift_share(store) is None
    assert store.stability("test", k=3, bootstrap=0).l2_center == "mixed"


def test_drift_share_columns_are_checked(tmp_path: Path) -> None:
    store, _ = _drifting_store(tmp_path / "s.zarr", 1.0)
    with pytest.raises(InvalidInputError, match="columns must be positions 0..15"):
        drift_share(store, columns=[0, 16])
