"""Example ids are integrity-checked like losses: one flipped bit used to rename an example (``t279`` ->
``t379``, now a duplicate) and scoring ran on. New stores checksum every ids chunk (checked on each read)
and keep a digest of the whole array; stores made before that are checked for blanks and duplicates,
which is what a damaged id most often leaves."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import daunce_store
from daunce_store import errors

FIXTURES = Path(__file__).parent / "fixtures"
N = 400


@pytest.fixture
def store(tmp_path):
    s = daunce_store.init(tmp_path / "s.zarr", [f"t{i}" for i in range(N)], {"test": ["q0", "q1", "q2"]}, chunk_rows=64)
    rng = np.random.default_rng(0)
    for k in range(3):
        s.append(f"p{k}", rng.standard_normal(N), {"test": rng.standard_normal(3)})
    return s


def _reads(path):
    s = daunce_store.open(path, mode="r")
    return [lambda: s.train_ids, lambda: s.topk("test", k=2, measure="cov"), lambda: s.train_index(["t1"])]


def test_new_ids_carry_checksum_and_digest(store):
    arr = zarr.open_group(str(store.url))["train/ids"]
    assert daunce_store.store.ids_checksummed(arr)
    assert arr.attrs["sha256"] == daunce_store.store.ids_digest(store.train_ids)


def test_flipped_bit_in_ids_is_caught(store, tmp_path):
    chunk = tmp_path / "s.zarr" / "train" / "ids" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    for read in _reads(tmp_path / "s.zarr"):
        with pytest.raises(errors.CorruptChunkError, match="train/ids.* (are damaged|fails its checksum)"):
            read()


def test_missing_ids_chunk_is_caught(store, tmp_path):
    (tmp_path / "s.zarr" / "queries" / "test" / "ids" / "c" / "0").unlink()
    s = daunce_store.open(tmp_path / "s.zarr", mode="r")
    with pytest.raises(errors.CorruptChunkError, match="chunk 'queries/test/ids/c/0' .* is missing"):
        s.topk("test", k=2)


def test_old_store_without_checksums_still_opens_and_catches_duplicates(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "store-d6d7dbd.zarr", path)
    arr = zarr.open_group(str(path))["train/ids"]
    assert not daunce_store.store.ids_checksummed(arr)
    ids = daunce_store.open(path, mode="r").train_ids  # intact: opens and reads as before
    arr[5] = ids[7]  # what a flipped character did in the field: one id turned into another
    with pytest.raises(errors.CorruptChunkError, match=f"duplicates \\['{ids[7]}'\\].* predates id checksums"):
        daunce_store.open(path, mode="r").topk("test", k=2)


def test_ids_of_listed_rows_match_and_are_checked(tmp_path, monkeypatch):
    """Naming a top-k reads only the id chunks that hold its rows and builds only those strings; the rows
    read get the same checks (checksum, missing chunk) on both decoders (Rust and numcodecs)."""
    import daunce_store._ext as ext_module
    import daunce_store.store._loss_store as loss_store

    n = 40000  # three id chunks of 2^14
    ids = [f"ex-{i:06d}-{'é' if i % 7 == 0 else ''}" for i in range(n)]
    daunce_store.init(tmp_path / "s.zarr", ids)
    rows = np.array([39999, 5, 5, 16384, 0, 20000, 16383])
    for decoder in ("rust", "numcodecs"):
        if decoder == "numcodecs":
            monkeypatch.setattr(loss_store, "extension", lambda: None)
        elif ext_module.extension() is None:
            continue
        fresh = daunce_store.open(tmp_path / "s.zarr", mode="r")
        assert fresh.train_ids_at(rows).tolist() == [ids[r] for r in rows]
        assert fresh._train_ids is None  # the whole array was never read
    chunk = tmp_path / "s.zarr" / "train" / "ids" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x04
    chunk.write_bytes(bytes(data))
    fresh = daunce_store.open(tmp_path / "s.zarr", mode="r")
    assert fresh.train_ids_at([0, 39999]).tolist() == [ids[0], ids[39999]]  # other chunks still read
    with pytest.raises(errors.CorruptChunkError, match="chunk 'train/ids/c/1' .* fails its checksum"):
        fresh.train_ids_at([16384])
    chunk.unlink()
    with pytest.raises(errors.CorruptChunkError, match="chunk 'train/ids/c/1' .* is missing"):
        daunce_store.open(tmp_path / "s.zarr", mode="r").train_ids_at([20000])
