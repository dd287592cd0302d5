"""The -corr measures' per-row scales persisted beside their K × K matrix (``_daunce/row-scales``): a fresh
handle and a second process score with them instead of a K × K transform per row; a writer killed at any
storage operation of them leaves none or whole ones visible and the next reader's answer equals the
unpersisted one; scales whose key no longer matches, or whose bytes do not match their record, are ignored;
read-only handles never write them; `daunce compact` writes them, `daunce verify` checks them and `daunce gc`
keeps them; and the answers equal the in-pass transform's on random and adversarial losses, every backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import daunce_store
from daunce_store import _constants as C
from daunce_store.scoring import _measures
from daunce_store.scoring._backend import accumulator_class, available_backends
from daunce_store.store import read_row_scales

from test_persisted_gram import CORR_ATOL, REPO, _adversarial, _build, _random, _same, kill_at_each_op, store_path  # noqa: F401 (a fixture)

NORMALISED = ("nystrom-corr", "whitened-corr", "auto-corr")


def _scales_records(path: Path) -> list[Path]:
    return sorted((path / C.SCALES_PREFIX).rglob("*.json"))


def _scales_objects(path: Path) -> list[Path]:
    return sorted((path / C.SCALES_PREFIX).rglob("*.f32"))


def _unpersisted(path: Path, measure: str, method: str = "topk", **options):
    """The in-pass transform's answer: a read-only handle of the store with its row scales moved away."""
    aside = path.parent / "scales-aside"
    shutil.rmtree(aside, ignore_errors=True)
    if (path / C.SCALES_PREFIX).exists():
        shutil.move(path / C.SCALES_PREFIX, aside)
    try:
        return getattr(daunce_store.open(path, "r"), method)("test", measure=measure, **options)
    finally:
        if aside.exists():
            shutil.move(aside, path / C.SCALES_PREFIX)


class ScalePasses:
    """Counts row-scale passes (the real ``_measures.row_scales``, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        real = _measures.row_scales

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(_measures, "row_scales", counted)


def _reference_scales(path: Path, kind: str) -> np.ndarray:
    """One pass's scales, persisted nowhere."""
    store = daunce_store.open(path, "r")
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap)
    gram = _measures.gram_for(store, snap, slots, kind)
    root = _measures.root_of(gram.preconditioner()).astype(np.float32)
    scales = _measures.row_scales(store.iter_row_blocks(snapshot=snap, slots=slots), store.n_train, root)
    assert scales is not None
    return scales


def _cached_scales(store: daunce_store.LossStore):
    (found,) = [v for key, v in store.derived_cache.items() if key[0] == "row-scales"]
    return found


# --- reuse ----------------------------------------------------------------------------------------------
def test_a_fresh_handle_reuses_the_persisted_scales(store_path, monkeypatch):
    want = _unpersisted(store_path, "whitened-corr", k=7)
    passes = ScalePasses(monkeypatch)
    first = daunce_store.open(store_path).topk("test", k=7, measure="whitened-corr")
    assert passes.count == 1 and len(_scales_records(store_path)) == 1 and len(_scales_objects(store_path)) == 1
    fresh = daunce_store.open(store_path, "r")
    got = fresh.topk("test", k=7, measure="whitened-corr")
    assert passes.count == 1, "a fresh handle reads the persisted scales instead of passing over the rows"
    np.testing.assert_array_equal(_cached_scales(fresh), _reference_scales(store_path, "whitened"))
    _same(got, first)
    _same(got, want, CORR_ATOL)


def test_a_second_process_uses_the_persisted_scales(store_path):
    """`daunce topk` (read-only, its own process) reads the record and its object and writes nothing; its
    scores follow scales planted at twice the true ones (every score doubles)."""
    writer = daunce_store.open(store_path)
    want = writer.topk("test", ["q1"], k=5, measure="whitened-corr", side="pos")
    (record_path,) = _scales_records(store_path)
    record = json.loads(record_path.read_text())
    doubled = (2 * _reference_scales(store_path, "whitened")).astype("<f4").tobytes()
    import hashlib

    sha = hashlib.sha256(doubled).hexdigest()
    (record_path.parent / f"{sha}.f32").write_bytes(doubled)
    record_path.write_text(json.dumps({**record, "sha256": sha, "object": f"{C.SCALES_PREFIX}/whitened/{sha}.f32"}))
    trace = store_path.parent / "ops.txt"
    env = {**os.environ, "DAUNCE_STORE_TRACE_OPS": str(trace), "PYTHONPATH": str(REPO)}
    env.pop("DAUNCE_STORE_FAILPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "daunce_store.cli", "topk", str(store_path), "--query-set", "test", "--query", "q1",
                           "-k", "5", "--side", "pos", "--measure", "whitened-corr", "--format", "json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["records"]
    assert [r["train_index"] for r in got] == want.indices["pos"][0].tolist()
    np.testing.assert_allclose([r["score"] for r in got], 2 * want.scores["pos"][0], rtol=1e-6)
    ops = trace.read_text().splitlines()
    assert any(op == f"get {C.SCALES_PREFIX}/whitened/{sha}.f32" for op in ops), ops
    assert not any(op.startswith("put") for op in ops), "a read-only process writes nothing"


def test_a_read_only_handle_never_writes_scales(store_path, monkeypatch):
    passes = ScalePasses(monkeypatch)
    ro = daunce_store.open(store_path, "r")
    ro.topk("test", k=4, measure="auto-corr")
    assert passes.count == 0 and _scales_records(store_path) == [] and _cached_scales(ro) is None


def test_a_column_selection_keeps_the_in_pass_transform(store_path, monkeypatch):
    """Scales belong to the whole column set's M; a selection has its own M, so it transforms in the pass."""
    daunce_store.open(store_path).topk("test", k=3, measure="whitened-corr")
    passes = ScalePasses(monkeypatch)
    store = daunce_store.open(store_path)
    got = store.topk("test", k=6, measure="whitened-corr", columns=[0, 2, 5, 7])
    assert passes.count == 0 and not [k for k in store.derived_cache if k[0] == "row-scales"]
    _same(got, _unpersisted(store_path, "whitened-corr", k=6, columns=[0, 2, 5, 7]))


# --- crashes and stale records ----------------------------------------------------------------------------
WRITER = """
import sys, daunce_store
store = daunce_store.open(sys.argv[1])
store.topk("test", k=3, measure="whitened-corr")
"""


def test_a_writer_killed_at_each_storage_op_of_its_scales_leaves_none_or_whole_ones(store_path):
    """The writer's operations are counted from its op log; it is then killed (SIGKILL just before the
    operation) at each one from the scales' first read on. Afterwards the store holds no scales or whole
    ones (equal to one pass's, bit for bit), the next reader's answer equals the unpersisted one, and
    verify finds nothing wrong (an object no record names is a killed writer's, never read)."""
    want = _unpersisted(store_path, "whitened-corr", k=3)
    reference = _reference_scales(store_path, "whitened")

    def clear() -> None:
        for folder in (C.MATRICES_PREFIX, C.SCALES_PREFIX):
            shutil.rmtree(store_path / folder, ignore_errors=True)

    killed_at = []
    for op in kill_at_each_op(WRITER, store_path, C.SCALES_PREFIX, clear):
        killed_at.append(op)
        store = daunce_store.open(store_path, "r")
        snap = store.snapshot()
        found = read_row_scales(store, "whitened", snap, store.committed_slots(snapshot=snap))
        assert found is None or np.array_equal(found, reference), op
        _same(store.topk("test", k=3, measure="whitened-corr"), want, CORR_ATOL)
        assert store.verify(grace_seconds=0).ok, op
    assert any(op.startswith(f"put {C.SCALES_PREFIX}/") and op.endswith(".json") for op in killed_at), killed_at


def test_scales_whose_key_or_bytes_no_longer_match_are_ignored(tmp_path, monkeypatch):
    path = tmp_path / "a.zarr"
    _build(path, *_random())
    daunce_store.open(path).topk("test", k=3, measure="whitened-corr")
    passes = ScalePasses(monkeypatch)
    store = daunce_store.open(path, "r")
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap)
    assert read_row_scales(store, "whitened", snap, slots) is not None

    # Bytes that do not match the record's sha256 (a damaged object): ignored, named by verify, kept by gc.
    (obj,) = _scales_objects(path)
    good = obj.read_bytes()
    obj.write_bytes(good[:-4] + b"\0\0\0\0")
    assert read_row_scales(daunce_store.open(path, "r"), "whitened", snap, slots) is None
    report = daunce_store.open(path, "r").verify(grace_seconds=0)
    assert [f.what for f in report.findings if f.kind == "damage"] == ["row-scales"], report.findings
    _same(daunce_store.open(path, "r").topk("test", k=3, measure="whitened-corr"), _unpersisted(path, "whitened-corr", k=3))
    obj.write_bytes(good)

    # A record copied from another store (same slots and ids, other commits and losses) under this one's name.
    other = tmp_path / "b.zarr"
    _build(other, *_random(5))
    daunce_store.open(other).topk("test", k=3, measure="whitened-corr")
    (mine,) = _scales_records(path)
    (theirs,) = _scales_records(other)
    (their_obj,) = _scales_objects(other)
    saved = mine.read_bytes()
    mine.write_bytes(theirs.read_bytes())
    shutil.copy(their_obj, path / C.SCALES_PREFIX / "whitened" / their_obj.name)
    assert read_row_scales(daunce_store.open(path, "r"), "whitened", snap, slots) is None
    mine.write_bytes(saved)

    # A commit record changed (a store restored from another copy): the columns' checksums differ, so a
    # writable handle makes new scales under a new key.
    commit = path / C.COMMITS_PREFIX / "000003.json"
    rec = json.loads(commit.read_text())
    rec["committed_at"] = "2001-01-01T00:00:00Z"
    commit.write_text(json.dumps(rec))
    fresh = daunce_store.open(path)
    assert read_row_scales(fresh, "whitened", fresh.snapshot(), slots) is None
    passes.count = 0
    fresh.topk("test", k=3, measure="whitened-corr")
    assert passes.count == 1 and len(_scales_records(path)) == 2


def test_gc_keeps_scales_and_verify_checks_them(store_path):
    store = daunce_store.open(store_path)
    store.topk("test", k=3, measure="nystrom-corr")
    store.topk("test", k=3, measure="whitened-corr")
    files = _scales_records(store_path) + _scales_objects(store_path)
    before = {p: p.read_bytes() for p in files}
    assert len(before) == 4
    store.compact()
    store.gc(grace_seconds=0)
    assert {p: p.read_bytes() for p in _scales_records(store_path) + _scales_objects(store_path)} == before
    report = store.verify(grace_seconds=0)
    assert report.ok and not [f for f in report.findings if C.SCALES_PREFIX in f.key], report.findings
    # Compaction moved the rows (the fused pass now reads packed chunks); the scales still serve them.
    reader = daunce_store.open(store_path, "r")
    reader.topk("test", k=3, measure="whitened-corr")
    assert _cached_scales(reader) is not None
    # A record whose object is gone: damage.
    _scales_objects(store_path)[0].unlink()
    assert "row-scales" in [f.what for f in daunce_store.open(store_path, "r").verify(grace_seconds=0).findings]


def test_daunce_compact_persists_the_default_measures_scales(tmp_path, monkeypatch):
    """`daunce topk` opens the store read-only; `daunce compact` leaves it the scales its default needs."""
    from typer.testing import CliRunner

    from daunce_store.cli import app

    path = tmp_path / "s.zarr"
    _build(path, *_random())
    result = CliRunner().invoke(app, ["compact", str(path)])
    assert result.exit_code == 0, result.output
    assert len(_scales_records(path)) == 1
    passes = ScalePasses(monkeypatch)
    ro = daunce_store.open(path, "r")
    got = ro.topk("test", k=3)  # auto-corr: nystrom-corr here
    assert passes.count == 0 and _cached_scales(ro) is not None
    _same(got, _unpersisted(path, "auto-corr", k=3), CORR_ATOL)


# --- the same answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("losses", [_random, _adversarial], ids=["random", "adversarial"])
def test_scaled_answers_equal_the_in_pass_transform_on_every_backend(tmp_path, losses):
    path = tmp_path / "s.zarr"
    _build(path, *losses())
    backends = [b for b in available_backends() if accumulator_class(b).takes_row_scales]
    for measure in NORMALISED:
        for backend in backends:
            want = _unpersisted(path, measure, k=9, backend=backend)
            want_mean = _unpersisted(path, measure, "influence", k=9, backend=backend)
            daunce_store.open(path).topk("test", k=9, measure=measure, backend=backend)  # writes the scales
            scaled = daunce_store.open(path, "r")
            _same(scaled.topk("test", k=9, measure=measure, backend=backend), want, CORR_ATOL)
            _same(scaled.influence("test", k=9, measure=measure, backend=backend), want_mean, CORR_ATOL)
            assert _cached_scales(scaled) is not None
    assert len(_scales_records(path)) == 2  # one per kind


def test_a_row_with_no_spread_under_m_scores_zero(tmp_path):
    """A constant train row has ū = 0: its scale is 0 and so is every score, as in the in-pass transform."""
    train, query = _random()
    train[[4, 250]] = 3.0
    path = tmp_path / "s.zarr"
    _build(path, train, query)
    daunce_store.open(path).topk("test", k=3, measure="whitened-corr")
    scales = _cached_scales_of(path)
    assert scales[4] == 0 and scales[250] == 0 and (np.delete(scales, [4, 250]) > 0).all()
    full = daunce_store.open(path, "r").topk("test", k=len(train), measure="whitened-corr", side="pos")
    for j in range(len(query)):
        row = dict(zip(full.indices["pos"][j].tolist(), full.scores["pos"][j].tolist()))
        assert row[4] == 0 and row[250] == 0


def _cached_scales_of(path: Path) -> np.ndarray:
    store = daunce_store.open(path, "r")
    snap = store.snapshot()
    found = read_row_scales(store, "whitened", snap, store.committed_slots(snapshot=snap))
    assert found is not None
    return found


def test_the_fused_read_and_score_pass_takes_the_scales(store_path, monkeypatch):
    """With the Rust kernel on a local store the rows go through the fused pass (the kernel reads the chunk
    files), scaled, with no transform set, before and after compaction, and rank as the in-pass transform does."""
    from daunce_store.scoring import _backend

    if "rust" not in available_backends():
        pytest.skip("the Rust extension is not available")
    want = _unpersisted(store_path, "nystrom-corr", k=8, backend="rust")
    daunce_store.open(store_path).topk("test", k=3, measure="nystrom-corr")
    calls: list[str] = []
    for name in ("push_chunks", "set_row_scales", "set_transform", "push_block"):
        real = getattr(_backend._RustTopK, name)
        monkeypatch.setattr(_backend._RustTopK, name, lambda self, *a, _real=real, _name=name: (calls.append(_name), _real(self, *a))[1])
    for compacted in (False, True):
        calls.clear()
        _same(daunce_store.open(store_path, "r").topk("test", k=8, measure="nystrom-corr", backend="rust"), want, CORR_ATOL)
        assert calls[0] == "set_row_scales" and "push_chunks" in calls and "set_transform" not in calls and "push_block" not in calls, calls
        if not compacted:
            daunce_store.open(store_path).compact()
