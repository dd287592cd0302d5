"""``daunce append --matrix`` / ``daunce append-queries`` / ``LossStore.append_matrix`` on real stores on disk."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import AlreadyCommittedError, InvalidInputError, MissingQueryLossesWarning
from daunce_store.store import append_query_matrix

runner = CliRunner()
N, M, P = 20, 4, 3
PIDS = [f"p{k}" for k in range(P)]
TRAIN_IDS = [f"t{i}" for i in range(N)]
QUERY_IDS = [f"q{j}" for j in range(M)]


def _new_store(path: Path) -> daunce_store.LossStore:
    return daunce_store.init(path, TRAIN_IDS, {"test": QUERY_IDS}, chunk_rows=8)


def _losses(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, P)).astype(np.float32), rng.standard_normal((M, P)).astype(np.float32)


def _frame(train: np.ndarray, query: np.ndarray | None, seed: int = 1) -> pd.DataFrame:
    """The table layout, rows shuffled."""
    parts = [pd.DataFrame({"set": "train", "id": TRAIN_IDS, **{p: train[:, k] for k, p in enumerate(PIDS)}})]
    if query is not None:
        parts.append(pd.DataFrame({"set": "test", "id": QUERY_IDS, **{p: query[:, k] for k, p in enumerate(PIDS)}}))
    frame = pd.concat(parts, ignore_index=True)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _text(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _digest(path: Path) -> str:
    """A hash of every file (names and bytes) under ``path``: equal means the store is unchanged."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _columns(store: daunce_store.LossStore) -> pd.DataFrame:
    frame = store.to_pandas()
    return frame.drop(columns=[c for c in frame.columns if c not in ("set", "id", *PIDS)]).sort_values(["set", "id"]).reset_index(drop=True)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_matrix_equals_one_by_one(tmp_path: Path, suffix: str) -> None:
    train, query = _losses()
    reference = _new_store(tmp_path / "ref.zarr")
    for k, p in enumerate(PIDS):
        reference.append(p, train[:, k], {"test": query[:, k]})
    path = tmp_path / f"s{suffix}.zarr"
    _new_store(path)
    matrix = tmp_path / f"losses{suffix}"
    if suffix == ".npz":
        order, qorder = np.random.default_rng(3).permutation(N), np.random.default_rng(4).permutation(M)
        np.savez(matrix, ids=np.array(TRAIN_IDS)[order], perturbations=np.array(PIDS), train=train[order],
                 query_ids__test=np.array(QUERY_IDS)[qorder], query__test=query[qorder])
    else:
        _write(_frame(train, query), matrix)
    result = runner.invoke(app, ["append", str(path), "--matrix", str(matrix), "--metadata", '{"api": "x"}'])
    assert result.exit_code == 0, result.output
    assert "committed 3 perturbations" in result.output
    store = daunce_store.open(path)
    pd.testing.assert_frame_equal(_columns(store), _columns(reference))
    assert [c.perturbation for c in store.commits()] == PIDS
    assert store.commits()[0].metadata == {"source": "append-matrix", "api": "x"}
    assert store.snapshot().query_slots["test"] == (0, 1, 2)


def test_library_dataframe_and_no_set_column(tmp_path: Path) -> None:
    train, _ = _losses()
    store = daunce_store.init(tmp_path / "s.zarr", TRAIN_IDS)
    frame = _frame(train, None).drop(columns="set")
    commits = store.append_matrix(frame, metadata={"run": 1})
    assert [c.perturbation for c in commits] == PIDS
    np.testing.assert_array_equal(store.to_pandas().set_index("id").loc[TRAIN_IDS, PIDS].to_numpy(), train)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f[f["id"] != "t3"], r"1 of the train set's 20 ids are missing \(e.g. 't3'\)"),
        (lambda f: pd.concat([f, f.iloc[:1].assign(id="zz")]), r"1 ids are not in the train set \(e.g. 'zz'\)"),
        (lambda f: pd.concat([f, f[f["id"] == "t5"]]), r"duplicate ids \['t5'\]"),
        (lambda f: f.assign(p1=np.where(f["id"] == "t7", np.nan, f["p1"])), r"NaN, inf .*'t7' under 'p1'"),
        (lambda f: f.assign(p1=np.where(f["id"] == "t7", 1e20, f["p1"])), r"max \|loss\| 1e\+20\) \(e.g. 't7' under 'p1'\) in perturbations 'p1'.*diverged"),
        (lambda f: f.assign(set=np.where(f["id"] == "q0", "nope", f["set"])), r"\['nope'\] are neither `train` nor a query set"),
        (lambda f: f.rename(columns={"p2": "bad id!"}), r"perturbation id 'bad id!'"),
        (lambda f: f.drop(columns="id"), r"no `id` column"),
    ],
    ids=["missing", "extra", "duplicate", "nan", "exploding", "unknown-set", "bad-pid", "no-id"],
)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_bad_matrix_is_refused_store_unchanged(tmp_path: Path, edit, message: str, suffix: str) -> None:
    train, query = _losses()
    path = tmp_path / "s.zarr"
    _new_store(path).append("p9", train[:, 0], {"test": query[:, 0]})
    before = _digest(path)
    matrix = _write(edit(_frame(train, query)), tmp_path / f"bad{suffix}")
    result = runner.invoke(app, ["append", str(path), "--matrix", str(matrix)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(message, _text(result)), result.output
    assert _digest(path) == before


def test_already_committed_refused_before_anything(tmp_path: Path) -> None:
    train, query = _losses()
    path = tmp_path / "s.zarr"
    _new_store(path).append("p2", train[:, 2], {"test": query[:, 2]})
    before = _digest(path)
    matrix = _write(_frame(train, query), tmp_path / "m.parquet")
    result = runner.invoke(app, ["append", str(path), "--matrix", str(matrix)])
    assert result.exit_code == 2 and "already committed" in _text(result) and "'p2'" in _text(result), result.output
    assert _digest(path) == before
    with pytest.raises(AlreadyCommittedError, match="nothing was appended"):
        daunce_store.open(path).append_matrix(matrix)
    assert _digest(path) == before


def test_npz_shape_mismatch_refused(tmp_path: Path) -> None:
    train, _ = _losses()
    path = tmp_path / "s.zarr"
    _new_store(path)
    before = _digest(path)
    np.savez(tmp_path / "m.npz", ids=np.array(TRAIN_IDS), perturbations=np.array(PIDS[:2]), train=train)
    result = runner.invoke(app, ["append", str(path), "--matrix", str(tmp_path / "m.npz")])
    assert result.exit_code == 2 and "expected (20, 2)" in _text(result), result.output
    assert _digest(path) == before


def test_matrix_and_single_options_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _new_store(path)
    np.save(tmp_path / "l.npy", np.zeros(N, np.float32))
    both = runner.invoke(app, ["append", str(path), "--matrix", str(tmp_path / "x.parquet"), "--perturbation", "p0"])
    assert both.exit_code == 2 and "drop --perturbation" in _text(both)
    neither = runner.invoke(app, ["append", str(path), "--train", str(tmp_path / "l.npy")])
    assert neither.exit_code == 2 and "--matrix" in _text(neither)


def test_midway_failure_names_committed_and_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent writer commits p1 after the checks: p0 stays, the error names p0 and p1, p2."""
    train, query = _losses()
    store = _new_store(tmp_path / "s.zarr")
    real = daunce_store.LossStore.append

    def racing(self, pid, *args, **kwargs):
        if pid == "p1":
            real(self, "p1", train[:, 1], {"test": query[:, 1]})  # the other writer wins
        return real(self, pid, *args, **kwargs)

    monkeypatch.setattr(daunce_store.LossStore, "append", racing)
    with pytest.raises(AlreadyCommittedError) as info:
        store.append_matrix(_frame(train, query))
    text = str(info.value)
    assert "1 committed and kept ('p0')" in text and "2 not committed ('p1', 'p2')" in text
    assert info.value.committed == ["p0"] and info.value.not_committed == ["p1", "p2"]
    assert sorted(c.perturbation for c in store.commits()) == ["p0", "p1"]


def test_warning_without_query_losses(tmp_path: Path) -> None:
    train, query = _losses()
    path = tmp_path / "s.zarr"
    store = _new_store(path)
    with pytest.warns(MissingQueryLossesWarning, match=r"perturbation 'a0' committed without losses for query set\(s\) \['test'\].*append-queries"):
        store.append("a0", train[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.append("a1", train[:, 1], {"test": query[:, 1]})  # all sets given: silent
    with pytest.warns(MissingQueryLossesWarning, match=r"3 perturbations") as record:
        store.append_matrix(_frame(train, None).rename(columns={p: f"m{p}" for p in PIDS}))
    assert len([w for w in record if w.category is MissingQueryLossesWarning]) == 1  # one for the matrix
    np.save(tmp_path / "l.npy", train[:, 2])
    out = runner.invoke(app, ["append", str(path), "--perturbation", "a2", "--train", str(tmp_path / "l.npy")])
    assert out.exit_code == 0, out.output
    assert "warning (MissingQueryLossesWarning)" in _text(out) and "append-queries" in _text(out)


def test_append_queries_round_trip(tmp_path: Path) -> None:
    train, query = _losses()
    path = tmp_path / "s.zarr"
    store = daunce_store.init(path, TRAIN_IDS)
    store.append_matrix(_frame(train, None))
    (tmp_path / "late.txt").write_text("\n".join(QUERY_IDS) + "\n")
    assert runner.invoke(app, ["add-queries", str(path), "--query-set", f"late={tmp_path / 'late.txt'}"]).exit_code == 0
    late = pd.DataFrame({"id": QUERY_IDS, **{p: query[:, k] for k, p in enumerate(PIDS)}}).iloc[::-1]
    before = _digest(path)
    # unknown perturbation / bad ids: refused, nothing written
    for frame, message in [
        (late.assign(zz=1.0), "not committed"),
        (late.iloc[1:], "missing"),
        (late.assign(p0=np.nan), "NaN"),
    ]:
        out = runner.invoke(app, ["append-queries", str(path), "--query-set", "late", "--matrix", str(_write(frame, tmp_path / "bad.csv"))])
        assert out.exit_code == 2 and message in _text(out), out.output
        assert _digest(path) == before
    unknown = runner.invoke(app, ["append-queries", str(path), "--query-set", "nope", "--matrix", str(_write(late, tmp_path / "late.parquet"))])
    assert unknown.exit_code == 2 and "unknown query set 'nope'" in _text(unknown)
    out = runner.invoke(app, ["append-queries", str(path), "--query-set", "late", "--matrix", str(tmp_path / "late.parquet")])
    assert out.exit_code == 0, out.output
    assert "late: losses for 3 perturbations added (3 of 3 columns have them)" in _text(out)
    store = daunce_store.open(path)
    assert store.snapshot().query_slots["late"] == (0, 1, 2)
    got = store.to_pandas()
    got = got[got["set"] == "late"].set_index("id").loc[QUERY_IDS, PIDS].to_numpy()
    np.testing.assert_array_equal(got, query)
    before = _digest(path)
    again = runner.invoke(app, ["append-queries", str(path), "--query-set", "late", "--matrix", str(tmp_path / "late.parquet")])
    assert again.exit_code == 2 and "already has losses" in _text(again)
    assert _digest(path) == before
    with pytest.raises(InvalidInputError, match="append-queries fills query set 'late' only"):
        append_query_matrix(store, "late", late.assign(set="train"))
