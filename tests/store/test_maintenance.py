"""``verify`` (fsck) and ``gc`` (space reclaim): every kind of damage is found and named, and what killed
writers and racing compactors leave behind is reclaimed without ever touching a committed column or a
live writer's slot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import obstore
import pytest
import zarr
from typer.testing import CliRunner

from _support import Location, assert_consistent, column, fill
from daunce_store import errors
from daunce_store.cli import app
from daunce_store.store import Storage

N, M = 96, 4


def _store(location: Location, **kwargs):
    kwargs = {"chunk_rows": 32, "capacity": 64, "pack_width": 2, **kwargs}
    return location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, **kwargs)


def _leak_slot(store, pid: int, rows: int = N) -> int:
    """What a writer killed between its chunk writes and its commit leaves: a claimed slot with data."""
    slot = store._claim_slot(f"p{pid}", "killed-writer")
    store._train_losses[:rows, slot] = column(pid, N)[:rows]
    return slot


def _raw(location: Location):
    return Storage(location.url(), location.options)._log_store()


def test_verify_clean_store(location: Location) -> None:
    s = _store(location)
    fill(s, range(5))
    s.compact()
    report = s.verify()
    assert report.ok and report.findings == []
    assert report.checked["chunks"] == 5 * 3 + 5 * 1 + 2 * 3  # train, query, packed groups x row chunks


@pytest.mark.parametrize("damage", ["missing-chunk", "flipped-byte", "nan-chunk", "diverged-chunk", "changed-id", "packed-differs",
                                    "commit-wrong-slot"])
def test_verify_names_each_damage(location: Location, damage: str) -> None:
    s = _store(location)
    fill(s, range(4))
    s.compact()
    slot = {c.perturbation: c.slot for c in s.commits()}["p1"]
    raw = _raw(location)
    key = f"train/losses/c/1/{slot}"
    if damage == "missing-chunk":
        obstore.delete(raw, key)
    elif damage == "flipped-byte":
        data = bytearray(bytes(obstore.get(raw, key).bytes()))
        data[7] ^= 0x10
        obstore.put(raw, key, bytes(data))
    elif damage == "nan-chunk":  # a valid chunk (checksum and all) that holds NaN: written by something else
        zarr.open_group(s._storage.zarr_store)["train/losses"][40, slot] = np.nan
    elif damage == "diverged-chunk":  # 1e20: valid float32, written before appends refused |loss| > MAX_ABS_LOSS
        zarr.open_group(s._storage.zarr_store)["train/losses"][40, slot] = 1e20
    elif damage == "changed-id":  # still unique and checksummed: only the digest can tell
        zarr.open_group(s._storage.zarr_store)["train/ids"][3] = "t3-renamed"
        key = "train/ids"
    elif damage == "packed-differs":
        zarr.open_group(s._storage.zarr_store)["train/packed"][5, 1] = 123.0
        key = "train/packed/c/0/0"
    elif damage == "commit-wrong-slot":
        rec = json.loads(bytes(obstore.get(raw, "_daunce/commits/p2.json").bytes()))
        rec["slot"] = slot
        obstore.put(raw, "_daunce/commits/p2.json", json.dumps(rec).encode())
        key = "_daunce/commits/p2.json"
    before = location.open(mode="r")
    if damage == "commit-wrong-slot":  # scoring refuses it too: the column would count twice
        with pytest.raises(errors.CorruptRecordError, match="names slot .* also named by"):
            before.topk("test", k=2, measure="cov")
    before = location.objects()
    report = location.open(mode="r").verify()
    assert location.objects() == before  # verify only reads
    assert not report.ok
    damaged = [f for f in report.findings if f.kind == "damage"]
    assert damaged and damaged[0].key == key, report.findings
    out = CliRunner().invoke(app, ["verify", location.url(), "--no-progress", "--format", "json",
                                   *(["--storage-options", json.dumps(location.options)] if location.options else [])])
    assert out.exit_code == 1, out.output
    assert json.loads(out.stdout)["findings"][0]["key"] == key


def test_gc_reclaims_leaked_slots_and_keeps_committed_columns(location: Location) -> None:
    s = _store(location)
    fill(s, range(3))
    leaked = [_leak_slot(s, 10), _leak_slot(s, 11, rows=40)]
    fill(s, range(3, 5))
    size = s._storage.size_bytes()
    assert s.status()["leaked_slots"] == leaked
    assert s.gc().slots == []  # younger than the default grace: maybe a live writer
    assert [f.what for f in s.verify().findings] == ["leaked-slot", "leaked-slot"]
    assert {f.kind for f in s.verify().findings} == {"note"}
    dry = s.gc(grace_seconds=0, dry_run=True)
    assert dry.slots == leaked and s._storage.size_bytes() == size
    report = s.gc(grace_seconds=0)
    assert report.slots == leaked and report.chunks_deleted == 3 + 2 and s._storage.size_bytes() < size
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3, 4]
    assert s.status()["leaked_slots"] == [] and location.open().verify().findings == []
    assert s.gc(grace_seconds=0).slots == []  # idempotent
    fill(s, range(5, 7))  # new slots come after the reclaimed ones; nothing is reused
    assert assert_consistent(location.open(mode="r")) == list(range(7))


def test_writer_slower_than_grace_loses_its_slot_loudly(tmp_path) -> None:
    """gc and a live writer race on the slot's fate record: exactly one wins. A gc that wins between
    the writer's chunk writes and its commit makes the append fail with nothing visible."""
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(2))
    writer = location.open()
    real_write = writer._write_column

    def write_then_gc(arr, slot, values):
        real_write(arr, slot, values)
        location.open().gc(grace_seconds=0)  # a gc that takes the in-flight slot for leaked

    writer._write_column = write_then_gc
    with pytest.raises(errors.ReclaimedError, match="reclaimed by `daunce gc`"):
        writer.append("p2", column(2, N), {"test": column(2, M, salt=1)})
    assert not writer.is_committed("p2")
    writer._write_column = real_write
    writer.append("p2", column(2, N), {"test": column(2, M, salt=1)})
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2]
    assert location.open().verify().ok


def test_writer_that_wins_the_fate_keeps_its_slot(tmp_path) -> None:
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(2))
    committed = s.commits()[-1]
    # A gc that lists the slot as leaked just before the commit record lands (the writer's fate is first).
    assert s._storage.get(f"_daunce/fates/slot-{committed.slot:08d}.json")["fate"] == "committed"
    assert not s._decide_fate("slot", committed.slot, s.gc(dry_run=True))


def _duplicate_groups(location: Location):
    """Two compactors that raced: the second read the pack map before the first published."""
    s = _store(location)
    fill(s, range(4))
    first, late = location.open(), location.open()
    assert first.compact() == [0, 1]
    late._pack_map = lambda: {}  # type: ignore[method-assign]  # its view from before the first published
    assert late.compact() == [2, 3]
    return location.open()


def test_gc_drops_duplicate_pack_groups(location: Location) -> None:
    s = _duplicate_groups(location)
    want = s.train_losses()
    assert s.status()["duplicate_groups"] == [2, 3]
    assert s.verify().ok
    report = s.gc(grace_seconds=0)
    # the duplicate groups' chunks, and the per-column chunks of the 4 packed columns
    assert sorted(report.groups) == [2, 3] and report.packed_slots == [0, 1, 2, 3]
    assert report.chunks_deleted == 2 * 3 + 4 * 3
    again = location.open(mode="r")
    np.testing.assert_array_equal(again.train_losses(), want)
    assert again.status()["duplicate_groups"] == [] and again.status()["packed_columns"] == 4
    assert again.verify().findings == []


def test_gc_reclaims_orphaned_pack_group(tmp_path) -> None:
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(4))
    c = location.open()
    real_put = c._storage.put_if_absent

    def die_before_publishing(key, record):  # a compactor killed between its group's chunks and its manifest
        if key.startswith("_daunce/fates/group-"):
            raise KeyboardInterrupt
        return real_put(key, record)

    c._storage.put_if_absent = die_before_publishing  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        c.compact()
    assert s.status()["orphaned_groups"] == [0]
    assert s.gc(grace_seconds=0).groups == [0]
    assert s.status()["orphaned_groups"] == [] and s.compact() == [1, 2]
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    assert location.open().verify().findings == []


def test_readers_and_writers_during_gc(tmp_path) -> None:
    """Readers score while gc reclaims leaked slots and duplicate groups and writers append: every answer
    is the same, and every append either commits intact or fails loudly with nothing visible."""
    import threading

    location = Location("local", str(tmp_path), None)
    s = _duplicate_groups(location)
    for i in range(6):
        _leak_slot(s, 200 + i)
    want = s.topk("test", k=5, measure="cov")
    snap = s.snapshot()
    stop = threading.Event()
    errors_seen: list[BaseException] = []

    def read() -> None:
        r = location.open(mode="r")
        while not stop.is_set():
            try:
                got = r.topk("test", k=5, measure="cov", snapshot=snap)
                np.testing.assert_array_equal(got.indices["pos"], want.indices["pos"])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors_seen.append(e)
                return

    outcomes: dict[int, str] = {}

    def write() -> None:
        w = location.open()
        for k in range(10, 16):
            try:
                w.append(f"p{k}", column(k, N), {"test": column(k, M, salt=1)})
                outcomes[k] = "committed"
            except errors.ReclaimedError:
                outcomes[k] = "reclaimed"

    threads = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for _ in range(3):
        location.open().gc(grace_seconds=0)
    threads[-1].join()
    location.open().gc(grace_seconds=0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen
    committed = [k for k, v in outcomes.items() if v == "committed"]
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3, *committed]
    assert location.open().verify().ok


def test_reclaimed_store_holds_each_loss_once(tmp_path) -> None:
    """Compaction copies columns into wide chunks; gc then frees the per-column copies (past its grace):
    a fully compacted and reclaimed store is at most 1.05x the raw loss bytes, and reads the same."""
    location = Location("local", str(tmp_path), None)
    n, k = 16384, 64
    s = location.init("s.zarr", [f"t{i}" for i in range(n)], {"test": ["q0", "q1"]}, chunk_rows=4096, capacity=128, pack_width=64)
    for j in range(k):
        s.append(f"p{j}", column(j, n), {"test": column(j, 2, salt=1)})
    want = s.train_losses()
    want_topk = s.topk("test", k=5, measure="cov")
    assert s.compact() == [0]
    doubled = s._storage.size_bytes()
    assert s.gc().packed_slots == []  # the group is younger than the grace period: readers may still use the columns
    report = s.gc(grace_seconds=0)
    assert report.packed_slots == list(range(k)) and report.chunks_deleted == k * 4
    raw = n * k * 4
    size = s._storage.size_bytes()
    assert doubled > 1.9 * raw and size <= 1.05 * raw, (doubled / raw, size / raw)
    again = location.open(mode="r")
    np.testing.assert_array_equal(again.train_losses(), want)
    np.testing.assert_array_equal(again.topk("test", k=5, measure="cov").indices["pos"], want_topk.indices["pos"])
    assert again.verify().findings == [] and again.status()["packed_columns_with_own_chunks"] == 0
    # A compactor that raced and packs the same columns again reads them from the pack.
    late = location.open()
    real_map, looks = late._pack_map, []

    def stale_first_look():  # its plan saw the store before the group was published; its reads see it now
        looks.append(1)
        return {} if len(looks) == 1 else real_map()

    late._pack_map = stale_first_look  # type: ignore[method-assign]
    assert late.compact() == [1]
    assert location.open().verify().ok
