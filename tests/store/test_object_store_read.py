"""Object stores on the Rust path (rust/src/chunks.rs): an ``s3://`` store's chunks are fetched by the
kernel's own client, verified and scored in Rust, with the answers of zarr-python's path (an object store's
columns of mixed chunk heights stay on zarr-python's path).

Each test runs against moto's server and against a real S3 server (``s3s-fs``, tests/conftest.py). That the
Rust path ran is asserted by the client's own GET counter, and that it did not by zarr-python's path
(``DAUNCE_STORE_NO_EXT=1``) by the counter standing still.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from _support import BUCKET, Location, column, fill
from daunce_store import _constants as C
from daunce_store import errors
from daunce_store._constants import NO_EXT_ENV
from daunce_store._ext import _built
from test_rust_read import EXPECTED, SLOT_CHOICES, _damage, _fused_calls, _store, assert_bits

N, M = 300, 4  # as test_rust_read: chunks of 64 rows, the last an edge chunk

pytestmark = pytest.mark.s3


@pytest.fixture(params=["moto", "s3s-fs"])
def object_location(request: pytest.FixtureRequest) -> Location:
    """A fresh prefix on moto's S3 server or on s3s-fs."""
    options = request.getfixturevalue("s3_endpoint" if request.param == "moto" else "s3s_endpoint")
    return Location("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}", options)


@pytest.fixture
def ext(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The extension; fails (not skips) when it is not built."""
    built = _built()
    assert built is not None and hasattr(built, "ObjectStoreChunks"), "the extension is not built: run `maturin develop --release`"
    monkeypatch.delenv(NO_EXT_ENV, raising=False)
    return built


def gets(store: Any) -> int:
    """The GETs the store's Rust client has sent (0 before it has one)."""
    client = store._storage.chunk_client
    return int(client.gets) if client else 0


def rust_and_zarr(monkeypatch: pytest.MonkeyPatch, store: Any, read: Any) -> tuple[Any, Any]:
    """``read()`` on the Rust path (asserting that its client fetched chunks), then on zarr-python's
    (asserting that it fetched none)."""
    before = gets(store)
    native = read()
    assert gets(store) > before, "the Rust reader did not fetch the chunks"
    monkeypatch.setenv(NO_EXT_ENV, "1")
    try:
        before = gets(store)
        reference = read()
        assert gets(store) == before, "NO_EXT still used the Rust reader"
    finally:
        monkeypatch.delenv(NO_EXT_ENV)
    return native, reference


@pytest.mark.parametrize("layout", ["columns", "packed", "mixed"])
@pytest.mark.parametrize("choice", ["all", "subset", "one-group-out-of-order"])
def test_blocks_are_bit_identical(object_location: Location, monkeypatch: pytest.MonkeyPatch, ext: Any, layout: str, choice: str) -> None:
    store = _store(object_location, layout)
    pick = SLOT_CHOICES[choice]
    slots = None if pick is None else pick(store.committed_slots())
    for read in (lambda: np.concatenate([b for _, b in store.iter_row_blocks(slots=slots, block_rows=100)]),
                 lambda: store.train_losses(slots=slots),
                 lambda: store.train_rows(np.array([0, 5, 63, 64, 200, 299]), slots=slots),
                 lambda: store.query_losses("test", slots=slots)):
        native, reference = rust_and_zarr(monkeypatch, store, read)
        assert_bits(native, reference)
    pids = {c.slot: int(c.perturbation[1:]) for c in store.commits()}
    whole = store.train_losses(slots=slots)
    for j, slot in enumerate(slots or store.committed_slots()):  # and both are the columns appended
        np.testing.assert_array_equal(whole[:, j], column(pids[slot], N))


def test_mixed_chunk_heights_keep_zarr_python(object_location: Location, monkeypatch: pytest.MonkeyPatch, ext: Any) -> None:
    """Young per-column chunks of 128 rows beside packed groups of 64: the object path needs one chunk
    height, so zarr-python reads these blocks (the client fetches nothing), with the columns appended."""
    store = object_location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]},
                                 chunk_rows=128, capacity=32, pack_width=4)
    fill(store, range(8))
    monkeypatch.setattr(C, "PACK_ROWS", 64)
    store.compact()
    fill(store, range(8, 10))
    assert {int(store._packed_array().chunks[0]), store.chunk_rows} == {64, 128}
    before = gets(store)  # compaction read the per-column chunks (one height) through Rust
    np.testing.assert_array_equal(store.train_losses(), np.stack([column(k, N) for k in range(10)], axis=1))
    assert gets(store) == before


@pytest.mark.parametrize("layout", ["columns", "packed"])
def test_topk_is_scored_in_rust_with_zarr_pythons_answers(object_location: Location, monkeypatch: pytest.MonkeyPatch, ext: Any,
                                                          layout: str) -> None:
    """Same top-k rows (bit-equal indices) and scores to float32 tolerance, m = 1 and m = 4, on the fused
    Rust pass (its client fetched every chunk; scan_fused took it) and on zarr-python's blocks."""
    store = _store(object_location, layout)
    taken = _fused_calls(monkeypatch)
    for measure in ("cov", "corr", "whitened"):
        for queries in (["q1"], None):
            native, reference = rust_and_zarr(monkeypatch, store,
                                              lambda: store.topk("test", queries, k=7, measure=measure))
            for side in ("pos", "neg"):
                np.testing.assert_array_equal(native.indices[side], reference.indices[side])
                np.testing.assert_allclose(native.scores[side], reference.scores[side], rtol=1e-5, atol=1e-6)
    assert taken == ["fused"] * 6, taken  # every Rust run fused (NO_EXT scores in numba, never asking)


@pytest.mark.parametrize("how", ["flipped", "missing", "nan"])
def test_damage_is_named(object_location: Location, monkeypatch: pytest.MonkeyPatch, ext: Any, how: str) -> None:
    """A damaged or missing object is named (array, chunk key) in the store's CorruptChunkError, in the
    same words on the fused pass, the Rust block reader and zarr-python's path."""
    store = _store(object_location, "packed")
    key = "train/packed/c/2/1"
    _damage(object_location, key, how)
    reopened = object_location.open(mode="r")
    taken = _fused_calls(monkeypatch)
    messages = []
    for env in ("", "1"):
        monkeypatch.setenv(NO_EXT_ENV, env)
        for read in (lambda: reopened.topk("test", k=3, measure="cov"), lambda: reopened.train_losses()):
            with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}' of .* {EXPECTED[how]}") as info:
                read()
            messages.append(str(info.value))
    assert taken == ["raised"]  # the fused pass met the damage (NO_EXT never asks for it)
    assert messages[:2] == messages[2:], "the two paths word the damage differently"
    assert gets(reopened) > 0


def test_an_unreachable_store_is_a_storage_error(s3s_endpoint: dict[str, Any], ext: Any) -> None:
    """A GET the client's retries could not get answered is the store's StorageError naming the chunk and
    what to do, not a claim of damage."""
    location = Location("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}", s3s_endpoint)
    _store(location, "packed")
    # The same objects through an endpoint nobody listens on (a port just closed), retries switched off.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = Location("s3", location.root, {**s3s_endpoint, "endpoint": f"http://127.0.0.1:{port}"})
    reader = location.open(mode="r")
    reader._storage.chunk_client = ext.ObjectStoreChunks(dead.url(), {**reader._storage.rust_client_options(),
                                                                     "endpoint": dead.options["endpoint"], "connect_timeout": "1s"})
    with pytest.raises(errors.StorageError, match="chunk '[^']+' of .* could not be fetched .* check that the store is reachable"):
        reader.topk("test", k=3, measure="cov")
