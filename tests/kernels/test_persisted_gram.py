"""The preconditioned measures' K × K matrices persisted in the store (``_daunce/matrices``): a fresh handle
and a second process use the record instead of a pass; a writer killed at any storage operation of its
record leaves none visible and the next reader recomputes the right one; a record whose key no longer
matches (other slots, a commit record changed, a record copied from another store, a torn one) is ignored;
a read-only handle never writes; answers equal the unpersisted path on random and adversarial losses; and
the preconditioners are registered classes, an unknown one an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import daunce_store
from daunce_store import _constants as C
from daunce_store.errors import InvalidInputError
from daunce_store.scoring import _measures
from daunce_store.scoring._measures import Gram, column_names, draws_of, gram_for
from daunce_store.scoring._preconditioners import PRECONDITIONERS, Preconditioner, preconditioner_named
from daunce_store.store import PerturbationDraw, read_derived_matrix, write_derived_matrix

N, M, K, SEED = 500, 5, 12, 11
PRECONDITIONED = ("nystrom", "whitened", "nystrom-corr", "whitened-corr", "auto", "auto-corr")
REPO = Path(__file__).resolve().parents[2]


def _build(path: Path, train: np.ndarray, query: np.ndarray, draws: bool = True) -> daunce_store.Store:
    n, k = train.shape
    store = daunce_store.init(path, [f"t{i}" for i in range(n)], {"test": [f"q{j}" for j in range(len(query))]},
                              seed=SEED, chunk_rows=64)
    for c in range(k):
        meta = {"draw": PerturbationDraw(SEED, c, ratio=0.5).to_metadata()} if draws else {}
        store.append(f"{c:06d}", train[:, c], {"test": query[:, c]}, metadata=meta)
    return store


def _random(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((3, K))
    train = (rng.standard_normal((N, 3)) @ latent + 0.3 * rng.standard_normal((N, K))).astype(np.float32)
    query = (rng.standard_normal((M, 3)) @ latent + 0.3 * rng.standard_normal((M, K))).astype(np.float32)
    return train, query


def _adversarial() -> tuple[np.ndarray, np.ndarray]:
    """Large offsets with small spreads (cancellation in the centering), identical rows (ties), a constant
    row, a near-constant column, and a scale of 1e6 on a few rows."""
    train, query = _random(1)
    train = (1e3 + train).astype(np.float32)
    train[[3, 90, 400]] = train[3]
    train[7] = 2.5
    train[:, 4] = 1e3 + 1e-3 * train[:, 4]
    train[[20, 21]] *= 1e6
    return train, (1e3 + query).astype(np.float32)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    _build(path, *_random())
    return path


def _records(path: Path) -> list[Path]:
    return sorted((path / C.MATRICES_PREFIX).rglob("*.json"))


class Passes:
    """Counts Gram passes (the real ``Gram.accumulate``, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        real = Gram.accumulate.__func__  # type: ignore[attr-defined]

        def counted(cls, *args, **kwargs):
            self.count += 1
            return real(cls, *args, **kwargs)

        monkeypatch.setattr(Gram, "accumulate", classmethod(counted))


def _pass(store: daunce_store.LossStore, kind: str, slots: list[int] | None = None) -> Gram:
    """The Gram of one pass, persisted nowhere: the reference."""
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap) if slots is None else slots
    draws = draws_of(snap, slots) if preconditioner_named(kind).needs_draws else []
    return Gram.accumulate(kind, store.iter_row_blocks(snapshot=snap, slots=slots), draws, column_names(snap, slots))


def _same(a, b, atol: float = 0.0) -> None:
    """Equal rankings: the same indices, scores equal (``atol``: to float32 rounding, for the -corr measures
    scored with persisted row scales against the in-pass transform)."""
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(a.indices[side], b.indices[side])
        if atol:
            np.testing.assert_allclose(a.scores[side], b.scores[side], rtol=0, atol=atol)
        else:
            np.testing.assert_array_equal(a.scores[side], b.scores[side])
    assert a.measure == b.measure


CORR_ATOL = 2e-6  # correlations in [-1, 1]: a few float32 ulps


# --- reuse ----------------------------------------------------------------------------------------------
def test_a_fresh_handle_reuses_the_persisted_matrix(store_path, monkeypatch):
    passes = Passes(monkeypatch)
    first = daunce_store.open(store_path).topk("test", k=7, measure="nystrom")
    assert passes.count == 1 and len(_records(store_path)) == 1
    fresh = daunce_store.open(store_path, "r")
    _same(fresh.topk("test", k=7, measure="nystrom"), first)
    _same(fresh.topk("test", k=7, measure="nystrom-corr"), daunce_store.open(store_path, "r").topk("test", k=7, measure="nystrom-corr"))
    assert passes.count == 1, "fresh handles read the record instead of passing over the rows"
    (gram,) = [v for key, v in fresh.derived_cache.items() if key[0] == "gram"]  # (beside the -corr row scales' entry)
    np.testing.assert_array_equal(gram.matrix, _pass(fresh, "nystrom").matrix)  # the record's bits are the pass's


def test_a_second_process_uses_the_persisted_matrix(store_path):
    """`daunce topk` in its own process (read-only) reads the record: its op log shows the read and no write,
    and its scores follow a record planted with twice the true matrix (whitened's M, hence its scores, halve)."""
    store = daunce_store.open(store_path, "r")
    want = store.topk("test", ["q1"], k=5, measure="whitened", side="pos")  # read-only: computed, not persisted
    assert _records(store_path) == []
    snap = store.snapshot()
    true = _pass(store, "whitened")
    writer = daunce_store.open(store_path)
    assert write_derived_matrix(writer, "whitened", snap, store.committed_slots(snapshot=snap), 2 * true.matrix, {"spread": true.spread})
    trace = store_path.parent / "ops.txt"
    env = {**os.environ, "DAUNCE_STORE_TRACE_OPS": str(trace), "PYTHONPATH": str(REPO)}
    env.pop("DAUNCE_STORE_FAILPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "daunce_store.cli", "topk", str(store_path), "--query-set", "test", "--query", "q1",
                           "-k", "5", "--side", "pos", "--measure", "whitened", "--format", "json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["records"]
    assert [r["train_index"] for r in got] == want.indices["pos"][0].tolist()
    np.testing.assert_allclose([r["score"] for r in got], want.scores["pos"][0] / 2, rtol=1e-5)
    ops = trace.read_text().splitlines()
    assert any(op.startswith(f"get {C.MATRICES_PREFIX}/whitened/") for op in ops), ops
    assert not any(op.startswith("put") for op in ops), "a read-only process writes nothing"


def test_a_read_only_handle_never_writes(store_path, monkeypatch):
    passes = Passes(monkeypatch)
    ro = daunce_store.open(store_path, "r")
    got = ro.topk("test", k=4, measure="auto")
    assert _records(store_path) == [] and passes.count == 1
    _same(daunce_store.open(store_path).topk("test", k=4, measure="auto"), got)  # a writable one computes and writes
    assert len(_records(store_path)) == 1 and passes.count == 2


# --- crashes and stale records ----------------------------------------------------------------------------
WRITER = """
import sys, daunce_store
store = daunce_store.open(sys.argv[1])
store.topk("test", k=3, measure="whitened")
"""


def kill_at_each_op(writer: str, store_path: Path, prefix: str, clear: Callable[[], None]) -> Iterator[str]:
    """Run ``writer`` (a Python script given the store's path) once to count its storage operations from its op
    log, then once per operation from the first one under ``prefix`` on, killed there (the failpoint harness:
    SIGKILL just before the operation runs), after ``clear()``. Yields each killed-at operation once the killed
    writer is gone, for the caller to check the store."""
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    base.pop("DAUNCE_STORE_FAILPOINT", None)
    trace = store_path.parent / "count.txt"
    subprocess.run([sys.executable, "-c", writer, str(store_path)], check=True, env={**base, "DAUNCE_STORE_TRACE_OPS": str(trace)})
    ops = trace.read_text().splitlines()
    first = next(i for i, op in enumerate(ops) if prefix in op)
    assert ops[first].startswith("get ") and any(op.startswith(f"put {prefix}/") for op in ops[first:]), ops
    for n in range(first + 1, len(ops) + 1):
        clear()
        proc = subprocess.run([sys.executable, "-c", writer, str(store_path)], env={**base, "DAUNCE_STORE_FAILPOINT": f"kill@any:{n}"},
                              capture_output=True)
        assert proc.returncode == -9, (n, ops[n - 1], proc.stderr[-500:])
        yield ops[n - 1]


def test_a_writer_killed_at_each_storage_op_of_its_record_leaves_none_visible(store_path):
    """Killed at each storage operation from the record's read on: afterwards there is no record or a whole
    one, and the next reader's matrix equals one pass's, bit for bit."""
    want = _pass(daunce_store.open(store_path, "r"), "whitened").matrix

    def clear() -> None:
        for record in _records(store_path):
            record.unlink()

    for op in kill_at_each_op(WRITER, store_path, C.MATRICES_PREFIX, clear):
        store = daunce_store.open(store_path, "r")
        snap = store.snapshot()
        found = read_derived_matrix(store, "whitened", snap, store.committed_slots(snapshot=snap))
        assert found is None or np.array_equal(found[0], want), op
        assert gram_for(store, snap, store.committed_slots(snapshot=snap), "whitened").matrix.tobytes() == want.tobytes()
        assert store.verify(grace_seconds=0).ok


def test_records_whose_key_no_longer_matches_are_ignored(tmp_path, monkeypatch):
    passes = Passes(monkeypatch)
    path = tmp_path / "a.zarr"
    _build(path, *_random())
    store = daunce_store.open(path)
    store.topk("test", k=3, measure="whitened")
    assert passes.count == 1
    # Other slots (a column selection reads the same record: centering is a projection; a query set with
    # fewer columns is another column set): its own pass, its own record.
    daunce_store.open(path).topk("test", k=3, measure="whitened", columns=[0, 2, 5])
    assert passes.count == 1, "a column selection is served by the whole set's matrix"
    other = store.committed_slots()[:6]
    gram_for(daunce_store.open(path), store.snapshot(), other, "whitened")
    assert passes.count == 2 and len(_records(path)) == 2
    # A commit record changed (a store restored from another copy): the columns' checksums differ.
    commit = path / C.COMMITS_PREFIX / "000003.json"
    rec = json.loads(commit.read_text())
    rec["committed_at"] = "2001-01-01T00:00:00Z"
    commit.write_text(json.dumps(rec))
    fresh = daunce_store.open(path)
    fresh.topk("test", k=3, measure="whitened")
    assert passes.count == 3 and len(_records(path)) == 3

    # A record copied from another store with the same slots but other losses, under this store's name.
    other_path = tmp_path / "b.zarr"
    train, query = _random(5)
    _build(other_path, train, query)
    daunce_store.open(other_path).topk("test", k=3, measure="whitened")
    passes.count = 0
    for record in _records(path):
        record.unlink()
    snap = fresh.snapshot()
    slots = fresh.committed_slots(snapshot=snap)
    assert write_derived_matrix(fresh, "whitened", snap, slots, np.eye(K), {"spread": "ok"})
    (mine,) = _records(path)
    (theirs,) = _records(other_path)
    mine.write_bytes(theirs.read_bytes())
    reader = daunce_store.open(path, "r")
    assert read_derived_matrix(reader, "whitened", snap, slots) is None
    np.testing.assert_array_equal(gram_for(reader, snap, slots, "whitened").matrix, _pass(reader, "whitened").matrix)
    assert passes.count == 2  # gram_for's and the reference's

    # A torn record (truncated) under the right name: ignored, and named by verify; gc keeps it.
    mine.write_bytes(theirs.read_bytes()[:100])
    assert read_derived_matrix(daunce_store.open(path, "r"), "whitened", snap, slots) is None
    report = daunce_store.open(path, "r").verify(grace_seconds=0)
    assert [f.what for f in report.findings if f.kind == "damage"] == ["matrix"], report.findings


def test_gc_keeps_live_records_and_verify_checks_them(store_path):
    store = daunce_store.open(store_path)
    store.topk("test", k=3, measure="nystrom")
    store.topk("test", k=3, measure="whitened")
    before = {p: p.read_bytes() for p in _records(store_path)}
    assert len(before) == 2
    store.compact()
    store.gc(grace_seconds=0)
    assert {p: p.read_bytes() for p in _records(store_path)} == before
    report = store.verify(grace_seconds=0)
    assert report.ok and not [f for f in report.findings if C.MATRICES_PREFIX in f.key], report.findings
    assert report.checked["records"] >= 2
    # Compaction moved the rows; the record still serves them (its key is the columns, not their chunks).
    passes_before = daunce_store.open(store_path, "r")
    passes_before.topk("test", k=3, measure="whitened")
    assert ("gram", "whitened", tuple(store.committed_slots())) in passes_before.derived_cache


# --- the same answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("losses", [_random, _adversarial], ids=["random", "adversarial"])
def test_persisted_answers_equal_the_unpersisted_path(tmp_path, losses):
    path = tmp_path / "s.zarr"
    _build(path, *losses())
    for measure in PRECONDITIONED:
        unpersisted = daunce_store.open(path, "r")  # computes, writes nothing
        want = unpersisted.topk("test", k=9, measure=measure)
        want_self = None if measure.endswith("corr") else unpersisted.self_influence(k=9, measure=measure, side="both")
        daunce_store.open(path).topk("test", k=9, measure=measure)  # writes the record
        persisted = daunce_store.open(path, "r")
        _same(persisted.topk("test", k=9, measure=measure), want, CORR_ATOL if measure.endswith("corr") else 0.0)
        if want_self is not None:
            _same(persisted.self_influence(k=9, measure=measure, side="both"), want_self)
        if measure.startswith("whitened"):  # (nystrom's subsets of random, unresponsive losses have no positive eigenvalue)
            st = persisted.stability("test", k=5, measure=measure, fractions=(0.5,), bootstrap=2)
            st0 = unpersisted.stability("test", k=5, measure=measure, fractions=(0.5,), bootstrap=2)
            for side in ("pos", "neg"):
                np.testing.assert_array_equal(st.indices[side], st0.indices[side])
                np.testing.assert_array_equal(st.stderr[side], st0.stderr[side])
                np.testing.assert_array_equal(st.overlap[side], st0.overlap[side])
    assert len(_records(path)) == 2  # one per kind, all measures of a kind share it


def test_a_persisted_tiny_spread_refuses_as_a_pass_does(tmp_path):
    """Losses that vary only below float32's range: the record keeps the spread, so a reader refuses as the
    pass that wrote it did."""
    train = np.full((N, K), 1e-40, np.float32)
    train[::2, ::3] = 2e-40
    query = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
    path = tmp_path / "s.zarr"
    _build(path, train, query, draws=False)
    for handle in (daunce_store.open(path), daunce_store.open(path, "r")):
        with pytest.raises(InvalidInputError, match="float32 cannot square them"):
            handle.topk("test", k=3, measure="whitened")
    assert len(_records(path)) == 1


def test_an_old_store_persists_and_scores_the_same(tmp_path):
    import shutil

    path = tmp_path / "old.zarr"
    shutil.copytree(Path(__file__).resolve().parents[1] / "store" / "fixtures" / "store-d6d7dbd.zarr", path)
    want = daunce_store.open(path, "r").topk("test", k=5, measure="auto")
    _same(daunce_store.open(path).topk("test", k=5, measure="auto"), want)
    assert len(_records(path)) == 1
    _same(daunce_store.open(path, "r").topk("test", k=5, measure="auto"), want)
    assert daunce_store.open(path, "r").verify(grace_seconds=0).ok


# --- preconditioners as registered classes ----------------------------------------------------------------
def test_an_unknown_preconditioner_is_an_error_everywhere(store_path):
    store = daunce_store.open(store_path, "r")
    block = np.ones((4, K), np.float32)
    for call in (lambda: preconditioner_named("ridge"), lambda: _measures.gram_part("ridge", block, 0),
                 lambda: Gram.from_parts("ridge", []), lambda: gram_for(store, store.snapshot(), store.committed_slots(), "ridge"),
                 lambda: Gram("ridge", np.eye(K)).preconditioner()):
        with pytest.raises(InvalidInputError, match="no preconditioner is called 'ridge'"):
            call()


def test_a_new_preconditioner_is_one_class(store_path):
    """A subclass registers itself; the Gram pass, the persisted record and M follow from it alone."""

    class Ridge(Preconditioner):
        name = "ridge-test"
        needs_draws = False
        help = corr_help = "a test preconditioner"

        def block_part(self, u, offset, draws):
            return (u.T @ u).astype(np.float64), np.zeros(0)

        def matrix(self, b, spread_constant):
            return np.linalg.inv(b + np.eye(len(b)))

    try:
        assert "ridge-test" in PRECONDITIONERS
        with pytest.raises(TypeError, match="already registered"):
            type("Again", (Preconditioner,), {"name": "ridge-test"})
        store = daunce_store.open(store_path)
        snap = store.snapshot()
        slots = store.committed_slots(snapshot=snap)
        gram = gram_for(store, snap, slots, "ridge-test")
        whitened = _pass(store, "whitened")
        np.testing.assert_array_equal(gram.matrix, whitened.matrix)  # the same block parts
        m = gram.preconditioner()
        p = np.eye(K) - 1.0 / K
        np.testing.assert_allclose(m, p @ np.linalg.inv(whitened.selected(None) + np.eye(K)) @ p)
        assert any("ridge-test" in str(r) for r in _records(store_path))
        assert gram.diagnostics() == {}
    finally:
        PRECONDITIONERS.pop("ridge-test", None)


def test_daunce_compact_persists_the_default_measures_matrices(tmp_path, monkeypatch):
    """Scoring commands open the store read-only; `daunce compact` leaves them the matrices they need."""
    from typer.testing import CliRunner

    from daunce_store.cli import app

    path = tmp_path / "s.zarr"
    train, query = _random()
    store = _build(path, train, query)
    store.add_query_set("half", ["t1", "t2"])  # a query set with fewer columns: a column set of its own
    for c in range(6):
        store.append_query_losses(f"{c:06d}", "half", train[1:3, c])
    result = CliRunner().invoke(app, ["compact", str(path)])
    assert result.exit_code == 0, result.output
    assert "persisted for 2 column set(s)" in result.output
    assert len(_records(path)) == 2
    passes = Passes(monkeypatch)
    ro = daunce_store.open(path, "r")
    ro.topk("test", k=3)  # auto-corr: nystrom-corr here (every column records its draw)
    ro.topk("half", k=3, measure="auto")
    ro.self_influence(k=3)
    assert passes.count == 0
    again = CliRunner().invoke(app, ["compact", str(path)])
    assert again.exit_code == 0 and passes.count == 0 and len(_records(path)) == 2


def test_an_object_store_persists_and_reuses_the_matrix(s3_endpoint, monkeypatch):
    """On S3 (moto) too: the create-if-absent record is written by a writable handle and read by a fresh one."""
    import uuid

    url = f"s3://daunce-test/{uuid.uuid4().hex}"
    train, query = _random()
    store = daunce_store.init(url, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, seed=SEED,
                              chunk_rows=64, storage_options=s3_endpoint)
    for c in range(K):
        store.append(f"{c:06d}", train[:, c], {"test": query[:, c]})
    passes = Passes(monkeypatch)
    want = daunce_store.open(url, "r", storage_options=s3_endpoint).topk("test", k=6, measure="auto")
    assert store._storage.list(C.MATRICES_PREFIX) == [] and passes.count == 1
    _same(daunce_store.open(url, storage_options=s3_endpoint).topk("test", k=6, measure="auto"), want)
    assert len(store._storage.list(C.MATRICES_PREFIX)) == 1 and passes.count == 2
    _same(daunce_store.open(url, "r", storage_options=s3_endpoint).topk("test", k=6, measure="auto"), want)
    assert passes.count == 2
