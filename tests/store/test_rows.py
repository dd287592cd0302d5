"""Row sources (``store.rows(snapshot, slots)``): the rows every scan reads, from the store's chunks or from
memory, cut into the same blocks with the same bits; the fused pass offered only where the store has one."""

from __future__ import annotations

import numpy as np
import pytest

import daunce_store
from daunce_store.errors import InvalidInputError
from daunce_store.store import MemoryRows, RowSource, StoreRows


def _gather(rows: RowSource, **options) -> tuple[list[int], np.ndarray]:
    blocks = list(rows.blocks(**options))
    for _, block in blocks:
        assert block.dtype == np.float32 and block.flags.c_contiguous
    return [offset for offset, _ in blocks], np.concatenate([block for _, block in blocks])


def test_store_rows_are_the_committed_columns(small_store):
    store, train, _ = small_store
    snap = store.snapshot()
    rows = store.rows(snap)
    assert isinstance(rows, StoreRows) and rows.n_rows == 300 and rows.slots == tuple(snap.slots)
    assert rows.chunk_rows == 64 and rows.unit_rows == 64
    offsets, got = _gather(rows, block_rows=50)
    assert offsets == list(range(0, 300, 50))
    np.testing.assert_array_equal(got, train)
    # A partition: blocks start at the range's start and stop at its end.
    offsets, got = _gather(rows, block_rows=64, row_range=(128, 250))
    assert offsets == [128, 192]
    np.testing.assert_array_equal(got, train[128:250])
    # Chosen slots, in the order given.
    picked = [snap.slots[5], snap.slots[0], snap.slots[3]]
    np.testing.assert_array_equal(_gather(store.rows(snap, picked))[1], train[:, [5, 0, 3]])


def test_a_slot_that_is_not_committed_is_refused(small_store):
    store, _, _ = small_store
    with pytest.raises(InvalidInputError, match="slot 99 is not a committed column"):
        store.rows(slots=[0, 99])


def test_memory_rows_cut_blocks_as_the_store_does(small_store):
    """Rows in memory give the store's blocks, offsets and bits (a server's scans then sum Gram parts in the
    same order), for every column or a subset in any order, over all rows or a partition."""
    store, train, _ = small_store
    snap = store.snapshot()
    held = list(snap.slots)
    losses = store.train_losses(snapshot=snap)
    losses.flags.writeable = False
    for chosen in (held, [held[6], held[2]], held[::-1]):
        memory = MemoryRows(losses, held, snap, chosen, store.chunk_rows, store.rows(snap, chosen).unit_rows)
        stored = store.rows(snap, chosen)
        assert (memory.n_rows, memory.slots, memory.unit_rows) == (stored.n_rows, stored.slots, stored.unit_rows)
        for options in ({}, {"block_rows": 50}, {"block_rows": 64, "row_range": (64, 300)}):
            want_offsets, want = _gather(stored, **options)
            got_offsets, got = _gather(memory, **options)
            assert got_offsets == want_offsets
            assert got.tobytes() == want.tobytes()
    whole = MemoryRows(losses, held, snap, held, store.chunk_rows, store.chunk_rows)
    offset, block = next(iter(whole.blocks()))
    assert not block.flags.writeable  # every column in order: a view of the shared rows, no copy


def test_only_a_store_offers_the_fused_pass(small_store):
    """``push_into`` hands a sink the chunk plan of a local store (where the Rust reader applies) and rows in
    memory decline, pushing nothing; a declined pass leaves the scan to the blocks."""
    from daunce_store.store._read import extension

    store, train, _ = small_store
    snap = store.snapshot()
    calls: list[tuple[int, int]] = []

    class Sink:
        def push_chunks(self, source, plan, r0, r1):
            assert source == store._chunk_source() and plan.ncols == len(snap.slots)
            calls.append((r0, r1))

    memory = MemoryRows(store.train_losses(snapshot=snap), snap.slots, snap, snap.slots, store.chunk_rows, store.chunk_rows)
    assert memory.push_into(Sink()) is False and calls == []
    fused = store.rows(snap).push_into(Sink(), (64, 300))
    if extension() is None:
        assert fused is False and calls == []
    else:
        assert fused is True and calls[0][0] == 64 and calls[-1][1] == 300
        assert all(a[1] == b[0] for a, b in zip(calls, calls[1:]))  # contiguous: every row once


def test_a_read_only_handle_reads_the_same_rows(small_store):
    store, train, _ = small_store
    reopened = daunce_store.open(store.url, "r")
    np.testing.assert_array_equal(_gather(reopened.rows())[1], train)
