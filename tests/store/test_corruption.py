"""Damaged bytes are reported by name, never read silently: a flipped byte in a chunk fails its crc32c
check (CorruptChunkError naming ``train/losses/c/<row>/<slot>``), a garbled commit-log record gives a
CorruptRecordError naming the record."""

from __future__ import annotations

import numpy as np
import obstore
import pytest

from _support import Location, fill
from daunce_store import errors
from daunce_store.store import Storage

N, M = 64, 3


@pytest.fixture
def store(location: Location):
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16, capacity=8)
    fill(s, range(4))
    return s


def _raw(location: Location):
    return Storage(location.url(), location.options)._log_store()


def _flip_byte(location: Location, key: str, offset: int) -> None:
    data = bytearray(bytes(obstore.get(_raw(location), key).bytes()))
    data[offset] ^= 0x40
    obstore.put(_raw(location), key, bytes(data))


def _write(location: Location, key: str, data: bytes) -> None:
    obstore.put(_raw(location), key, data)


@pytest.mark.parametrize("offset", [0, 37, -1], ids=["first", "middle", "checksum"])
def test_flipped_byte_in_train_chunk(location: Location, store, offset: int) -> None:
    slot = {c.perturbation: c.slot for c in store.commits()}["p2"]
    key = f"train/losses/c/2/{slot}"  # rows 32..47 of perturbation p2
    assert key in location.objects()
    _flip_byte(location, key, offset)
    reopened = location.open(mode="r")
    for read in (
        lambda: reopened.train_losses(),
        lambda: list(reopened.iter_row_blocks(block_rows=16)),
        lambda: reopened.topk("test", k=3),
        lambda: reopened.self_influence(k=3),
    ):
        with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}' .* is corrupt") as info:
            read()
        assert f"slot {slot}" in str(info.value)
    # Rows in other chunks and other columns still read.
    np.testing.assert_array_equal(reopened.train_losses(slots=[0, 1])[:16], store.train_losses(slots=[0, 1])[:16])


def test_flipped_byte_in_query_chunk(location: Location, store) -> None:
    _flip_byte(location, "queries/test/losses/c/0/1", 5)
    with pytest.raises(errors.CorruptChunkError, match="chunk 'queries/test/losses/c/0/1'"):
        location.open(mode="r").query_losses("test")


def test_truncated_chunk(location: Location, store) -> None:
    key = "train/losses/c/0/0"
    data = bytes(obstore.get(_raw(location), key).bytes())
    _write(location, key, data[: len(data) // 2])
    with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}'"):
        location.open(mode="r").train_losses()


@pytest.mark.parametrize(
    "garbage, match",
    [(b'{"perturbation": "p1", "sl', "not JSON"), (b"\xff\xfe\x00", "not JSON"), (b"[1, 2]", "not a JSON object"), (b'{"perturbation": "p1"}', "lacks or garbles 'slot'")],
    ids=["truncated", "binary", "list", "missing-field"],
)
def test_garbled_commit_record(location: Location, store, garbage: bytes, match: str) -> None:
    _write(location, "_daunce/commits/p1.json", garbage)
    reopened = location.open(mode="r")
    for call in (reopened.commits, reopened.snapshot, reopened.train_losses, reopened.status):
        with pytest.raises(errors.CorruptRecordError, match=f"'_daunce/commits/p1.json' .*{match}"):
            call()


def test_garbled_lease_record(location: Location, store) -> None:
    _write(location, "_daunce/leases/p9/00000000.json", b"{")
    with pytest.raises(errors.CorruptRecordError, match="_daunce/leases/p9/00000000.json"):
        location.open().claim("p9")


def test_garbled_root_metadata(location: Location, store) -> None:
    _write(location, "zarr.json", b"{not json")
    with pytest.raises(errors.NotADaunceStoreError, match="not a daunce store"):
        location.open()


def test_flipped_byte_with_zarrs_pipeline(tmp_path) -> None:
    """The Rust codec pipeline (PyPI ``zarrs``) raises RuntimeError on a bad checksum; still named."""
    pytest.importorskip("zarrs")
    import zarr

    import daunce_store

    s = daunce_store.init(tmp_path / "s.zarr", [f"t{i}" for i in range(N)], chunk_rows=16)
    fill(s, range(3), query_set=None)
    chunk = tmp_path / "s.zarr" / "train" / "losses" / "c" / "1" / "2"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 1
    chunk.write_bytes(bytes(data))
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        with pytest.raises(errors.CorruptChunkError, match="chunk 'train/losses/c/1/2'"):
            daunce_store.open(tmp_path / "s.zarr", mode="r").train_losses()


def _scoring_reads(s):
    """Every read path a user reaches: raw blocks, whole matrices, and scoring on every backend."""
    from daunce_store.scoring import available_backends

    yield "train_losses", lambda: s.train_losses()
    yield "iter_row_blocks", lambda: list(s.iter_row_blocks(block_rows=16))
    yield "query_losses", lambda: s.query_losses("test")
    for backend in available_backends():
        yield f"topk-{backend}", lambda backend=backend: s.topk("test", k=3, measure="cov", backend=backend)
    yield "self_influence", lambda: s.self_influence(k=3)
    yield "scores", lambda: s.scores("test", measure="cov").to_numpy()


@pytest.mark.parametrize("array", ["train/losses", "queries/test/losses", "train/packed"])
def test_missing_chunk_of_committed_column_is_named(location: Location, array: str) -> None:
    """A chunk absent from a committed column (a partial copy, an rsync, a lifecycle rule) used to read as
    NaN and rank silently; now every read path names the chunk."""
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]},
                      chunk_rows=16, capacity=8, pack_width=4)
    fill(s, range(4))
    if array == "train/packed":
        assert s.compact() == [0]
    row_chunk = 0 if array.startswith("queries") else 1  # M = 3 query rows fill one chunk
    key = f"{array}/c/{row_chunk}/{0 if array == 'train/packed' else 2}"
    assert key in location.objects()
    obstore.delete(_raw(location), key)
    reopened = location.open(mode="r")
    reads = dict(_scoring_reads(reopened))
    if array == "queries/test/losses":  # only the query side reads it
        reads = {k: v for k, v in reads.items() if k in ("query_losses", "scores") or k.startswith("topk")}
    else:
        del reads["query_losses"]
    for name, read in reads.items():
        with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}' .* is missing") as info:
            read()
        assert "daunce verify" in str(info.value), name


def test_kernel_refuses_nan_input() -> None:
    """The array-level kernel API never ranks NaN either: it says which input holds it."""
    from daunce_store.scoring import available_backends, topk

    rng = np.random.default_rng(0)
    train, queries = rng.standard_normal((20, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    bad = train.copy()
    bad[7, 1] = np.nan
    for backend in available_backends():
        with pytest.raises(errors.InvalidInputError, match="row 7"):
            topk([(0, bad)], queries, k=3, backend=backend)
        q = queries.copy()
        q[1, 0] = np.inf
        with pytest.raises(errors.InvalidInputError, match="quer"):
            topk([(0, train)], q, k=3, backend=backend)


@pytest.mark.parametrize("backend,fused", [("rust", "1"), ("rust", "0"), ("numpy", "1")])
def test_inf_written_past_the_store_is_named(tmp_path, monkeypatch, backend: str, fused: str) -> None:
    """`append` refuses inf, but a column edited by other means (zarr-python here, which keeps the chunk's
    checksum valid) must not score as NaN: every path names the row."""
    import zarr

    import daunce_store
    from _stores import build_store, make_losses

    if backend == "rust":
        from daunce_store.store._read import extension

        if extension() is None:
            pytest.skip("the extension is not built")
    train, query = make_losses(N, M, 6)
    store = build_store(tmp_path / "s.zarr", train, query, chunk_rows=16)
    slot = {c.perturbation: c.slot for c in store.commits()}["p3"]
    zarr.open_group(tmp_path / "s.zarr")["train/losses"][37, slot] = np.inf
    monkeypatch.setenv("DAUNCE_STORE_FUSED", fused)
    reopened = daunce_store.open(tmp_path / "s.zarr", mode="r")
    with pytest.raises(errors.InvalidInputError, match=r"train losses hold NaN or inf \(row 37\)"):
        reopened.topk("test", k=3, measure="cov", backend=backend)
