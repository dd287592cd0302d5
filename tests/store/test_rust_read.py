"""The Rust chunk reader (rust/src/read.rs) and zarr-python read the same bits and report the same damage.

Stores with the extension built read through ``_kernel.read_block`` (local files here; ``s3://`` objects in
test_object_store_read.py); ``DAUNCE_STORE_NO_EXT=1`` keeps zarr-python. Every block is compared bit for bit (NaN payloads and
signed zeros included) across layouts (per-column chunks, packed groups, both mixed), edge chunks,
slot orders and subsets, and block sizes that do not divide the chunks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pytest

import daunce_store
from _support import Location, column, fill
from daunce_store import errors
from daunce_store._constants import NO_EXT_ENV
from daunce_store._ext import _built
from daunce_store.store import Storage

N, M, WIDTH, ROWS = 300, 4, 4, 64  # 300 rows in chunks of 64: the last chunk is an edge chunk (44 rows)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The extension with its reader, counting its calls; fails (not skips) when it is not built."""
    ext = _built()
    assert ext is not None and hasattr(ext, "read_block"), "the extension is not built: run `maturin develop --release`"
    monkeypatch.delenv(NO_EXT_ENV, raising=False)
    calls = []
    real = ext.read_block

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])  # not the output buffer: holding it would stop a scan recycling it
        return real(*args, **kwargs)

    monkeypatch.setattr(ext, "read_block", spy)
    ext.calls = calls
    yield ext
    del ext.calls


def both(monkeypatch: pytest.MonkeyPatch, kernel: Any, read: Callable[[], Any]) -> tuple[Any, Any]:
    """``read()`` through the Rust reader (asserting that it ran), then through zarr-python."""
    monkeypatch.delenv(NO_EXT_ENV, raising=False)
    before = len(kernel.calls)
    native = read()
    assert len(kernel.calls) > before, "the Rust reader was not used"
    monkeypatch.setenv(NO_EXT_ENV, "1")
    before = len(kernel.calls)
    try:
        fallback = read()
    finally:
        monkeypatch.delenv(NO_EXT_ENV, raising=False)
    assert len(kernel.calls) == before, "NO_EXT still used the Rust reader"
    return native, fallback


def assert_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.flags.c_contiguous
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def _store(location: Location, layout: str, k: int = 10):
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]},
                      chunk_rows=ROWS, capacity=32, pack_width=WIDTH)
    fill(s, range(k))
    if layout != "columns":
        s.compact()  # 10 columns: groups of slots 0-3 and 4-7; slots 8, 9 stay per-column
    if layout == "mixed":
        fill(s, range(k, k + 3))  # young columns after the packed ones
    return s


SLOT_CHOICES = {
    "all": None,
    "reversed": lambda slots: slots[::-1],
    "subset": lambda slots: [slots[i] for i in (9, 2, 5, 0, 7)],
    "one-group-out-of-order": lambda slots: [slots[i] for i in (3, 1, 2, 0)],
    "one-group-in-order": lambda slots: slots[4:8],
}


@pytest.mark.parametrize("layout", ["columns", "packed", "mixed"])
@pytest.mark.parametrize("choice", list(SLOT_CHOICES))
@pytest.mark.parametrize("block_rows", [None, 37, 64, 1000])
def test_blocks_are_bit_identical(tmp_path: Path, monkeypatch, kernel, layout: str, choice: str, block_rows: int | None) -> None:
    store = _store(Location("local", str(tmp_path), None), layout)
    pick = SLOT_CHOICES[choice]
    slots = None if pick is None else pick(store.committed_slots())
    native, fallback = both(monkeypatch, kernel, lambda: list(store.iter_row_blocks(slots=slots, block_rows=block_rows)))
    assert [o for o, _ in native] == [o for o, _ in fallback] == list(range(0, N, block_rows or ROWS))
    for (_, a), (_, b) in zip(native, fallback):
        assert_bits(a, b)
    whole = np.concatenate([b for _, b in native])
    chosen = slots or store.committed_slots()
    pids = {c.slot: int(c.perturbation[1:]) for c in store.commits()}
    for j, slot in enumerate(chosen):  # and both are the columns that were appended
        np.testing.assert_array_equal(whole[:, j], column(pids[slot], N))
    native, fallback = both(monkeypatch, kernel, lambda: store.train_losses(slots=slots))
    assert_bits(native, fallback)
    rows = np.array([0, 5, 63, 64, 200, 256, 299])  # edge chunk rows included
    native, fallback = both(monkeypatch, kernel, lambda: store.train_rows(rows, slots=slots))
    assert_bits(native, fallback)


def test_query_losses_and_packed_groups_agree(tmp_path: Path, monkeypatch, kernel) -> None:
    store = _store(Location("local", str(tmp_path), None), "mixed")
    native, fallback = both(monkeypatch, kernel, lambda: store.query_losses("test"))
    assert_bits(native, fallback)
    packs = store._pack_map()
    assert packs and not set(store.committed_slots()) <= set(packs)  # really mixed
    # The packed copy and the per-column chunks hold the same bits (the reader may take either).
    slots = sorted(packs)
    native = store._read_rows(store._train_losses, 0, N, slots)
    per_column = store._read_rows(store._train_losses, 0, N, slots, use_packs=False)
    assert_bits(native, per_column)


def test_topk_is_the_same_either_way(tmp_path: Path, monkeypatch, kernel) -> None:
    store = _store(Location("local", str(tmp_path), None), "mixed")
    native, fallback = both(monkeypatch, kernel, lambda: store.topk("test", k=5, measure="cov").to_pandas())
    # NO_EXT also switches the scoring kernel (rust -> numba): same rows, scores to float32 tolerance.
    assert native.drop(columns="score").equals(fallback.drop(columns="score"))
    np.testing.assert_allclose(native["score"], fallback["score"], rtol=1e-5, atol=1e-6)


def _fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each ``LossStore.scan_fused`` call did: "fused" (took the fused read-and-score pass),
    "declined" (returned False: the caller reads blocks) or "raised"."""
    from daunce_store.store._loss_store import LossStore

    taken: list[str] = []
    real = LossStore.scan_fused

    def spy(self: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            used = real(self, *args, **kwargs)
        except Exception:
            taken.append("raised")
            raise
        taken.append("fused" if used else "declined")
        return used

    monkeypatch.setattr(LossStore, "scan_fused", spy)
    return taken


@pytest.mark.parametrize("layout", ["columns", "packed", "mixed"])
def test_fused_scan_ranks_as_the_block_path(tmp_path: Path, monkeypatch, kernel, layout: str) -> None:
    """topk and influence read and score in one pass (the kernel reads the chunk files) where they can;
    the answers are the block path's: same rows, scores to float32 rounding."""
    store = _store(Location("local", str(tmp_path), None), layout)
    taken = _fused_calls(monkeypatch)
    for measure in ("cov", "corr", "whitened"):
        for call in (lambda: store.topk("test", k=7, measure=measure), lambda: store.influence("test", k=7, measure=measure)):
            fused = call()
            monkeypatch.setenv("DAUNCE_STORE_FUSED", "0")
            blocks = call()
            monkeypatch.delenv("DAUNCE_STORE_FUSED")
            for side in ("pos", "neg"):
                np.testing.assert_array_equal(fused.indices[side], blocks.indices[side])
                # GEMM tiles of other heights (1 MB segments, not blocks) may round the last bit differently.
                np.testing.assert_allclose(fused.scores[side], blocks.scores[side], rtol=1e-6, atol=1e-7)
    assert taken == ["fused", "declined"] * 6  # every call fused, and declined under DAUNCE_STORE_FUSED=0


@pytest.mark.parametrize("how", ["flipped", "missing", "nan"])
def test_fused_scan_names_damage(tmp_path: Path, monkeypatch, kernel, how: str) -> None:
    location = Location("local", str(tmp_path), None)
    store = _store(location, "packed")
    taken = _fused_calls(monkeypatch)
    _damage(location, "train/packed/c/2/1", how)
    messages = []
    for fused in ("1", "0"):
        monkeypatch.setenv("DAUNCE_STORE_FUSED", fused)
        with pytest.raises(errors.CorruptChunkError, match=f"chunk 'train/packed/c/2/1' of .* {EXPECTED[how]}") as info:
            store.topk("test", k=3, measure="cov")
        messages.append(str(info.value))
    assert taken == ["raised", "declined"] and messages[0] == messages[1]


def _raw(location: Location):
    return Storage(location.url(), location.options)._log_store()


def _chunk(raw: Any, key: str) -> bytes:
    return bytes(obstore.get(raw, key).bytes())


def _damage(location: Location, key: str, how: str) -> None:
    raw = _raw(location)
    if how == "missing":
        obstore.delete(raw, key)
        return
    data = bytearray(_chunk(raw, key))
    if how == "flipped":
        data[37] ^= 0x40
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "nan":  # a well-formed chunk (good checksum) holding the fill value in a committed column
        import google_crc32c

        values = np.frombuffer(bytes(data[:-4]), dtype="<f4").copy()
        values[3] = np.nan
        body = values.tobytes()
        data = bytearray(body + np.uint32(google_crc32c.value(body)).tobytes())
    obstore.put(raw, key, bytes(data))


EXPECTED = {"flipped": "is corrupt", "truncated": "is corrupt", "missing": "is missing",
            "nan": "holds NaN where a committed column has finite losses"}


@pytest.mark.parametrize("how", list(EXPECTED))
@pytest.mark.parametrize("where", ["packed", "column"])
def test_damage_is_named_the_same_way(tmp_path: Path, monkeypatch, kernel, how: str, where: str) -> None:
    location = Location("local", str(tmp_path), None)
    store = _store(location, "mixed")
    young = [s for s in store.committed_slots() if s not in store._pack_map()][0]
    key = "train/packed/c/2/1" if where == "packed" else f"train/losses/c/2/{young}"  # rows 128..191
    assert key in location.objects()
    _damage(location, key, how)
    reopened = location.open(mode="r")
    messages = []
    for env in ("", "1"):
        monkeypatch.setenv(NO_EXT_ENV, env)
        before = len(kernel.calls)
        for read in (lambda: reopened.train_losses(), lambda: list(reopened.iter_row_blocks(block_rows=100)),
                     lambda: reopened.topk("test", k=3, measure="cov")):
            with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}' of .* {EXPECTED[how]}") as info:
                read()
            messages.append(str(info.value))
        assert (len(kernel.calls) > before) == (env == "")
        # Rows in other chunks still read, on both paths.
        assert_bits(next(iter(reopened.iter_row_blocks(block_rows=ROWS)))[1], next(iter(store.iter_row_blocks(block_rows=ROWS)))[1])
    assert messages[:3] == messages[3:], "the two paths word the damage differently"


def test_damage_the_rereading_misses_is_still_an_error(tmp_path: Path, monkeypatch, kernel) -> None:
    """If zarr-python read cleanly what the Rust reader refused (they disagree: a bug), the read still fails."""
    store = _store(Location("local", str(tmp_path), None), "packed")
    key = "train/packed/c/0/0"

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise kernel.ChunkReadError("corrupt", key, f"chunk '{key}' is corrupt (stored crc32c 0x1, computed 0x2)")

    monkeypatch.setattr(kernel, "read_block", refuse)
    with pytest.raises(errors.CorruptChunkError, match=f"chunk '{key}' of {tmp_path}.* is corrupt"):
        store.train_losses()


def test_every_location_reads_through_rust(location: Location, monkeypatch, kernel) -> None:
    """Local stores and s3:// stores alike (tests/store/test_object_store_read.py has the object path's own tests)."""
    store = _store(location, "mixed")
    expected = np.stack([column(k, N) for k in range(13)], axis=1)
    np.testing.assert_array_equal(store.train_losses(), expected)
    assert kernel.calls


SCRIPT = """
import hashlib, json, sys
import daunce_store
from daunce_store import _kernel
def refuse(*a, **k):
    raise AssertionError("the Rust reader ran under {env}=1")
_kernel.read_block = refuse
store = daunce_store.open(sys.argv[1], mode="r")
block = store.train_losses()
print(json.dumps({{"sha": hashlib.sha256(block.tobytes()).hexdigest(), "shape": list(block.shape)}}))
"""


def test_no_ext_env_forces_zarr_python(tmp_path: Path, monkeypatch, kernel) -> None:
    store = _store(Location("local", str(tmp_path), None), "mixed")
    native = store.train_losses()
    assert kernel.calls
    env = {**os.environ, NO_EXT_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(env=NO_EXT_ENV), store.url], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == list(native.shape)
    import hashlib

    assert out["sha"] == hashlib.sha256(native.tobytes()).hexdigest()


# --- the ids of given rows only (naming a top-k reads k ids, not n) -------------------------------------

IDS_N = 40_000  # three id chunks of 2^14 (new stores), the last one partial


@pytest.fixture
def ids_store(tmp_path: Path):
    train = np.random.default_rng(0).standard_normal((IDS_N, 3)).astype(np.float32)
    s = daunce_store.init(tmp_path / "ids.zarr", [f"id-{i}" for i in range(IDS_N)], {"test": ["q0", "q1"]}, chunk_rows=1 << 14)
    for c in range(3):
        s.append(f"p{c}", train[:, c], {"test": np.array([c, -c], np.float32)})
    return s


def test_train_ids_at_reads_only_the_chunks_it_needs(ids_store) -> None:
    store = daunce_store.open(ids_store.url, mode="r")
    assert store._train_ids_arr.chunks == (1 << 14,)
    rows = np.array([[39_999, 5], [5, 16_384]])  # any shape, order and repeats
    np.testing.assert_array_equal(store.train_ids_at(rows), np.array([["id-39999", "id-5"], ["id-5", "id-16384"]]))
    assert store._train_ids is None  # the whole array was not read
    assert store.train_ids_at([]).shape == (0,)
    with pytest.raises(errors.InvalidInputError, match="row 40000 is out of range"):
        store.train_ids_at([1, IDS_N])
    # A missing chunk is named; rows in the other chunks still read.
    Path(store.url, "train/ids/c/1").unlink()
    assert store.train_ids_at([0, 39_000]).tolist() == ["id-0", "id-39000"]
    with pytest.raises(errors.CorruptChunkError, match=r"chunk 'train/ids/c/1' of .* is missing"):
        store.train_ids_at([0, 20_000])


def test_train_ids_at_checks_checksums(ids_store) -> None:
    path = Path(ids_store.url, "train/ids/c/2")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    store = daunce_store.open(ids_store.url, mode="r")
    assert store.train_ids_at([3]).tolist() == ["id-3"]
    with pytest.raises(errors.CorruptChunkError, match="chunk 'train/ids/c/2' of .* fails its checksum"):
        store.train_ids_at([35_000])


def test_results_hold_only_the_ids_they_list(ids_store) -> None:
    store = daunce_store.open(ids_store.url, mode="r")
    result = store.topk("test", k=4, measure="cov")
    assert store._train_ids is None  # named from the listed rows' chunks only
    listed = np.unique(np.concatenate([result.indices[s].ravel() for s in result.indices]))
    assert len(result.train_ids) == len(listed) <= 16
    for r in result.records():
        assert r["train_id"] == f"id-{r['train_index']}"
    np.testing.assert_array_equal(result.train_ids[result.indices["pos"]], np.char.add("id-", result.indices["pos"].astype(str)))
    with pytest.raises(KeyError, match="not listed"):
        result.train_ids[int(np.setdiff1d(np.arange(20), listed)[0])]
    selfinf = store.self_influence(k=3, measure="cov")
    assert [r["train_id"] for r in selfinf.records()] == [f"id-{r['train_index']}" for r in selfinf.records()]


def test_recycled_block_buffers_never_overwrite_kept_blocks(tmp_path: Path, monkeypatch, kernel) -> None:
    """A scan reuses a block's buffer once its consumer lets go of it, never a block (or a view) it keeps."""
    store = _store(Location("local", str(tmp_path), None), "packed", k=8)
    expected = store.train_losses()
    for prefetch in (0, 2):
        buffers = {block.__array_interface__["data"][0] for _, block in store.iter_row_blocks(block_rows=16, prefetch=prefetch)}
        assert len(buffers) <= prefetch + 4  # a consumer that keeps nothing gets recycled buffers
        kept, views = {}, {}
        for offset, block in store.iter_row_blocks(block_rows=16, prefetch=prefetch):
            if offset % 48 == 0:
                kept[offset] = block
            elif offset % 48 == 16:
                views[offset] = block[1:, 2:]
        for offset, block in kept.items():
            assert_bits(block, expected[offset : offset + 16])
        for offset, view in views.items():
            np.testing.assert_array_equal(view, expected[offset + 1 : offset + 16, 2:])
