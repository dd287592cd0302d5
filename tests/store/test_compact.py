"""Compaction: committed per-column chunks packed into wide row-block chunks; reads are unchanged."""

from __future__ import annotations

import numpy as np
import obstore
import pytest

from _support import Location, assert_consistent, column, fill
from daunce_store import errors
from daunce_store.store import Storage

N, M, W = 100, 3, 4


@pytest.fixture
def store(location: Location):
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16, capacity=64, pack_width=W)
    fill(s, range(10))
    return s


def test_compact_packs_full_groups_and_reads_the_same(location: Location, store) -> None:
    before = store.train_losses()
    snap = store.snapshot()
    assert store.compact() == [0, 1]  # 8 of 10 columns; 2 stay young
    assert store.compact() == []
    assert store.status()["packed_columns"] == 2 * W
    assert "train/packed/c/0/1" in location.objects()
    reopened = location.open(mode="r")
    assert reopened._pack_map()  # the reader really takes the packed path
    np.testing.assert_array_equal(reopened.train_losses(), before)
    np.testing.assert_array_equal(reopened.train_losses(snapshot=snap), before)
    for off, block in reopened.iter_row_blocks(block_rows=30):
        np.testing.assert_array_equal(block, before[off : off + 30])
    # Any subset and order of columns, mixing packed and young ones.
    cols = [9, 0, 5, 4, 8]
    np.testing.assert_array_equal(reopened.train_losses(slots=cols), np.stack([column(k, N) for k in cols], 1))
    fill(store, range(10, 12))
    assert store.compact() == [2]
    assert assert_consistent(location.open(mode="r")) == list(range(12))
    result = location.open(mode="r").topk("test", k=3, measure="cov", backend="numpy")
    dense = np.cov(np.vstack([store.train_losses(), store.query_losses("test")]).astype(np.float64))[:N, N:]
    np.testing.assert_array_equal(result.indices["pos"][0], np.argsort(-dense[:, 0], kind="stable")[:3])


def test_a_killed_compactors_group_is_skipped(location: Location, store) -> None:
    # A compactor claimed group 0 and died before writing its manifest.
    Storage(location.url(), location.options).put_if_absent("_daunce/pack-claims/00000000.json", {"slots": [0, 1, 2, 3]})
    assert store.compact() == [1, 2]
    reopened = location.open(mode="r")
    assert {g for g, _ in reopened._pack_map().values()} == {1, 2}
    assert assert_consistent(reopened) == list(range(10))


def test_corrupt_packed_chunk_is_named(location: Location, store) -> None:
    store.compact()
    key = "train/packed/c/3/1"  # rows 48..63 of group 1
    raw = Storage(location.url(), location.options)._log_store()
    data = bytearray(bytes(obstore.get(raw, key).bytes()))
    data[10] ^= 1
    obstore.put(raw, key, bytes(data))
    with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}'"):
        location.open(mode="r").train_losses()


def test_compact_read_only_refused(location: Location, store) -> None:
    before = location.objects()
    with pytest.raises(errors.InvalidInputError, match="read-only"):
        location.open(mode="r").compact()
    assert location.objects() == before
