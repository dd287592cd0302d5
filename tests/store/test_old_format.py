"""A store written by the first release (commit d6d7dbd: per-column and packed chunks, a query set added
later, a live lease, no recorded draws) opens, reads and scores the same with this code, and takes new
columns. The fixture was written by that commit's code (tests/store/fixtures/store-d6d7dbd.zarr)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import daunce_store

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def old_store(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "store-d6d7dbd.zarr", path)
    return daunce_store.open(path), np.load(FIXTURES / "store-d6d7dbd-expected.npz")


@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_reads_and_scores_the_same(old_store, backend):
    store, want = old_store
    np.testing.assert_array_equal(store.train_losses(), want["train"])
    np.testing.assert_array_equal(store.query_losses("test"), want["query"])
    np.testing.assert_array_equal(store.query_losses("later"), want["later"])
    assert store.status()["packed_columns"] == 4 and len(store.leases()) == 1
    for measure in ("cov", "corr"):
        res = store.topk("test", k=5, measure=measure, backend=backend)
        np.testing.assert_array_equal(res.indices["pos"], want[f"{measure}_idx"])
    np.testing.assert_allclose(store.topk("test", k=5, measure="cov", backend=backend).scores["pos"], want["cov_scores"], rtol=1e-5)
    # Its columns record no draws: the default measure falls back to whitened, and says so.
    assert store.topk("test", k=3, measure="auto", backend=backend).measure == "whitened"
    assert store.topk("test", k=3, backend=backend).measure == "whitened-corr"  # topk's default: auto-corr


def test_takes_new_columns(old_store):
    store, want = old_store
    rng = np.random.default_rng(1)
    store.append("000006", rng.standard_normal(40).astype(np.float32), {"test": rng.standard_normal(3).astype(np.float32)})
    assert store.num_columns() == 7
    assert store.topk("test", k=2, measure="cov").num_columns == 7
    np.testing.assert_array_equal(store.train_losses()[:, :6], want["train"])
