"""The store's contract, run on every backend (local directory and S3 over loopback): append, read,
snapshots, top-k, leases, status."""

from __future__ import annotations

import numpy as np
import pytest

from _support import Location, assert_consistent, column, fill
from daunce_store import errors

N, M, K = 100, 4, 6


@pytest.fixture
def store(location: Location):
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16, capacity=64)
    fill(s, range(K))
    return s


def test_roundtrip_bit_identical(location: Location, store) -> None:
    reopened = location.open(mode="r")
    assert assert_consistent(reopened) == list(range(K))
    assert reopened.train_ids.tolist() == [f"t{i}" for i in range(N)]
    assert reopened.query_ids("test").tolist() == [f"q{j}" for j in range(M)]
    assert [c.metadata["seed"] for c in reopened.commits()] == list(range(K))


def test_row_blocks(store) -> None:
    want = np.stack([column(k, N) for k in range(K)], axis=1)
    for rows in (16, 30, N):
        blocks = list(store.iter_row_blocks(block_rows=rows))
        assert [off for off, _ in blocks] == list(range(0, N, rows))
        for off, block in blocks:
            assert block.dtype == np.float32 and block.flags.c_contiguous
            np.testing.assert_array_equal(block, want[off : off + rows])


def test_snapshot_is_isolated_from_later_appends(location: Location, store) -> None:
    snap = store.snapshot()
    fill(location.open(), [K, K + 1])  # another handle appends
    assert len(snap) == K and store.num_columns() == K + 2
    assert store.train_losses(snapshot=snap).shape == (N, K)
    assert store.train_losses().shape == (N, K + 2)


def test_topk_matches_dense_covariance(store) -> None:
    train, query = store.train_losses(), store.query_losses("test")
    result = store.topk("test", k=5, measure="cov", backend="numpy")
    full = np.cov(np.vstack([train, query]).astype(np.float64))[:N, N:]
    for j in range(M):
        want = np.argsort(-full[:, j], kind="stable")[:5]
        np.testing.assert_array_equal(result.indices["pos"][j], want)


def test_query_set_added_later(location: Location, store) -> None:
    store.add_query_set("late", ["a", "b"])
    assert store.snapshot().query_slots.get("late", ()) == ()
    for k in range(K):
        store.append_query_losses(f"p{k}", "late", column(k, 2, salt=5))
    with pytest.raises(errors.AlreadyCommittedError):
        store.append_query_losses("p0", "late", column(0, 2, salt=5))
    reopened = location.open(mode="r")
    np.testing.assert_array_equal(reopened.query_losses("late"), np.stack([column(k, 2, salt=5) for k in range(K)], 1))


def test_leases(location: Location, store) -> None:
    other = location.open()
    assert store.claim("p0") is None  # committed
    lease = store.claim("p50", worker="a", ttl=60)
    assert lease is not None and lease.generation == 0
    assert other.claim("p50") is None  # live lease held by someone else
    assert other.claim_next(["p0", "p50", "p51"], worker="b").perturbation == "p51"
    assert [r["perturbation"] for r in store.leases()] == ["p50", "p51"]
    before = location.objects()
    with pytest.raises(errors.LeaseError, match="leased by worker 'a'"):
        other.append("p50", column(50, N))
    assert location.objects() == before
    renewed = store.renew(lease, ttl=120)
    assert renewed.generation == 1 and renewed.expires_at > lease.expires_at
    store.append("p50", column(50, N), lease=renewed)
    assert store.is_committed("p50")
    assert [r["perturbation"] for r in store.leases()] == ["p51"]
    with pytest.raises(errors.LeaseError, match="taken over"):
        store.renew(lease)  # a stale generation


def test_capacity(location: Location) -> None:
    s = location.init("small.zarr", ["a", "b", "c"], capacity=2)
    fill(s, range(2), query_set=None)
    before = location.objects("small.zarr")
    with pytest.raises(errors.CapacityError, match="all 2 column slots"):
        s.append("p2", column(2, 3))
    assert location.objects("small.zarr") == before


def test_status(store) -> None:
    info = store.status()
    assert info["n_train"] == N and info["committed_columns"] == K
    assert info["query_sets"] == {"test": {"m": M, "columns": K}}
    assert info["format_version"] == 1 and info["leases_in_flight"] == 0
    assert info["size_bytes"] > N * K * 4


def test_to_pandas_and_export(location: Location, store, tmp_path) -> None:
    import pandas as pd

    wide = store.to_pandas()
    assert list(wide.columns) == ["set", "id"] + [f"p{k}" for k in range(K)]
    assert len(wide) == N + M and (wide["set"] == "train").sum() == N
    np.testing.assert_array_equal(wide.loc[wide["set"] == "test", "p3"].to_numpy(), column(3, M, salt=1))
    long = store.to_pandas(form="long")
    assert len(long) == (N + M) * K
    assert store.export(tmp_path / "x.parquet", form="long") == (N + M) * K
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "x.parquet"), long)
    with pytest.raises(errors.InvalidInputError, match="wide' or 'long"):
        store.to_pandas(form="tall")
