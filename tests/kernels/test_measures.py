"""The preconditioned measures (nystrom, whitened and their normalised forms) on a real store: every backend's
streaming result equals a dense float64 reference written straight from the definitions (DESIGN §1.1), on
column subsets and resamples too; and on a linear-response store Nyström recovers the influence kernel
better than plain cov."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import InvalidInputError
from daunce_store.store import PerturbationDraw

from _topk_support import assert_valid_topk

SEED, N, M, K, D = 7, 600, 4, 24, 10
PRECONDITIONED = ("nystrom", "whitened", "nystrom-corr", "whitened-corr")


def _center(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.mean(axis=1, keepdims=True)


def _weights(draws: list[PerturbationDraw], n: int) -> np.ndarray:
    """W (n, K): w_ik = a_ik 1[i ∈ D_k] / |D_k|, each column drawn whole (not block by block)."""
    cols = []
    for d in draws:
        weights, members = d.linear_weights(0, n)
        cols.append(weights / members)
    return np.stack(cols, axis=1)


def reference(train: np.ndarray, query: np.ndarray, measure: str, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, m), self-scores (n,)) in float64 from the definitions."""
    u, q = _center(train), _center(query)
    kk = u.shape[1]
    if measure.startswith("whitened"):
        a = u.T @ u
        metric = np.linalg.inv(a + 0.3 * np.trace(a) / kk * np.eye(kk))
    else:
        b = _center(w).T @ u
        vals, vecs = np.linalg.eigh((b + b.T) / 2)
        metric = (vecs / np.maximum(vals, 0.03 * vals.max())) @ vecs.T
    s = u @ metric @ q.T
    self_u = np.einsum("ij,jk,ik->i", u, metric, u)
    if measure.endswith("-corr"):
        self_q = np.einsum("ij,jk,ik->i", q, metric, q)
        denom = np.sqrt(np.outer(np.maximum(self_u, 0), np.maximum(self_q, 0)))
        s = np.divide(s, denom, out=np.zeros_like(s), where=denom > 1e-12 * denom.max())  # a constant row: 0
    return s, self_u


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory):
    """Losses that respond linearly to the recorded draws: U = T W + noise, T = G H⁻¹ Gᵀ. Row 5 is
    constant across K (no signal) and rows 10 and 11 are identical (ties)."""
    rng = np.random.default_rng(0)
    g, gq = rng.standard_normal((N, D)), rng.standard_normal((M, D))
    h = np.diag(np.linspace(1.0, 4.0, D))
    draws = [PerturbationDraw(SEED, k, ratio=0.5) for k in range(K)]
    w = _weights(draws, N)
    dtheta = np.linalg.solve(h, g.T @ w)  # (D, K)
    train = (1.0 + g @ dtheta + 1e-3 * rng.standard_normal((N, K))).astype(np.float32)
    query = (1.0 + gq @ dtheta).astype(np.float32)
    train[5] = 0.7
    train[11] = train[10]
    path = tmp_path_factory.mktemp("measures") / "s.zarr"
    store = daunce_store.init(path, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, seed=SEED, chunk_rows=64)
    for k, d in enumerate(draws):
        store.append(f"{k:06d}", train[:, k], {"test": query[:, k]}, metadata={"draw": d.to_metadata()})
    truth = g @ np.linalg.solve(h, gq.T)
    return store, train, query, w, truth


@pytest.mark.parametrize("measure", PRECONDITIONED)
def test_streaming_topk_equals_dense_reference(linear_store, backend, measure):
    store, train, query, w, _ = linear_store
    s, _ = reference(train, query, measure, w)
    tol = 1e-4 * np.abs(s).max()
    res = store.topk("test", k=9, measure=measure, backend=backend)
    assert res.measure == measure and res.num_columns == K
    assert_valid_topk({side: (res.indices[side], res.scores[side]) for side in ("pos", "neg")}, s, 9, tol)
    np.testing.assert_allclose(store.scores("test", measure=measure).to_numpy(), s, rtol=1e-3, atol=tol)
    agg = store.influence("test", ["q1", "q3"], k=6, measure=measure, backend=backend)
    assert_valid_topk({side: (agg.indices[side], agg.scores[side]) for side in ("pos", "neg")}, s[:, [1, 3]].mean(1, keepdims=True), 6, tol)


def test_ties_and_constant_rows(linear_store, backend):
    store, *_ = linear_store
    for measure in PRECONDITIONED:
        dense = store.scores("test", measure=measure).to_numpy()
        assert np.all(dense[5] == 0.0), "a constant row has no signal under any measure"
        np.testing.assert_array_equal(dense[10], dense[11])
        res = store.topk("test", k=N, measure=measure, backend=backend)
        for j in range(M):
            order = res.indices["pos"][j].tolist()
            assert order.index(10) == order.index(11) - 1, "equal scores: the lower row index first"


@pytest.mark.parametrize("measure", ("nystrom", "whitened"))
def test_self_influence_is_u_m_u(linear_store, backend, measure):
    store, train, query, w, _ = linear_store
    _, self_u = reference(train, query, measure, w)
    res = store.self_influence(k=15, measure=measure, side="both", backend=backend)
    assert res.measure == measure
    assert_valid_topk({side: (res.indices[side], res.scores[side]) for side in ("pos", "neg")}, self_u[:, None], 15, 1e-4 * self_u.max())


@pytest.mark.parametrize("measure", PRECONDITIONED)
def test_column_subsets_and_resamples_get_their_own_matrix(linear_store, measure):
    """One Gram pass serves any column selection exactly, repeated columns (a bootstrap) included."""
    store, train, query, w, _ = linear_store
    for pos in (np.arange(12), np.array([3, 3, 0, 7, 19, 19, 19, 2, 11, 5])):
        s, _ = reference(train[:, pos], query[:, pos], measure, w[:, pos])
        got = store.scores("test", measure=measure, columns=pos.tolist()).to_numpy()
        np.testing.assert_allclose(got, s, rtol=1e-3, atol=1e-4 * np.abs(s).max())


def test_stability_full_list_is_the_topk(linear_store, backend):
    store, *_ = linear_store
    st = store.stability("test", k=8, measure="nystrom", fractions=(0.5,), bootstrap=3, backend=backend)
    top = store.topk("test", k=8, measure="nystrom", backend=backend)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(st.indices[side], top.indices[side])
        assert np.all(np.isfinite(st.stderr[side])) and np.all(st.stderr[side] >= 0)
    assert st.measure == "nystrom" and st.columns == (12, 24)
    assert 0.0 <= st.asymmetry < 0.2  # a linear response: W̄ᵀŪ = W̄ᵀTW̄ is nearly symmetric
    assert 0.0 <= st.negative_share <= 1.0
    other = store.stability("test", k=3, measure="whitened", bootstrap=0)
    assert other.asymmetry is None and other.negative_share is None


def test_nystrom_diagnostics_count_negative_eigenvalues_outside_the_centring_direction():
    from daunce_store.scoring._preconditioners import preconditioner_named

    k = 6
    basis, _ = np.linalg.qr(np.column_stack([np.ones(k), np.random.default_rng(3).standard_normal((k, k - 1))]))
    for spectrum, share in (([3.0, 2.0, 1.0, 0.5, 0.1], 0.0), ([3.0, 2.0, 1.0, -0.5, -0.2], 0.4)):
        b = basis[:, 1:] @ np.diag(spectrum) @ basis[:, 1:].T  # centred: the 1 direction has eigenvalue 0
        diag = preconditioner_named("nystrom").diagnostics(b)
        assert diag["negative_share"] == pytest.approx(share) and diag["asymmetry"] == pytest.approx(0.0, abs=1e-12)


def test_nystrom_recovers_the_influence_kernel_better_than_cov(linear_store):
    store, *_, truth = linear_store

    def fit(measure: str) -> float:
        s = store.scores("test", measure=measure).to_numpy()
        return float(np.mean([np.corrcoef(s[:, j], truth[:, j])[0, 1] for j in range(M)]))

    cov, nys, white = fit("cov"), fit("nystrom"), fit("whitened")
    assert nys > 0.98 > cov + 0.05, (nys, cov)
    assert white > cov, (white, cov)


def test_auto_picks_nystrom_only_when_every_column_records_its_draw(tmp_path, linear_store):
    store, train, query, *_ = linear_store
    assert store.topk("test", k=3, measure="auto").measure == "nystrom"
    assert store.topk("test", k=3).measure == "nystrom-corr"  # topk's default: auto-corr
    assert store.influence("test", k=3).measure == "nystrom"  # curation's: auto
    plain = daunce_store.init(tmp_path / "p.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]})
    for k in range(4):
        plain.append(f"x{k}", train[:, k], {"test": query[:, k]})
    assert plain.topk("test", k=3, measure="auto").measure == "whitened"
    assert plain.topk("test", k=3).measure == "whitened-corr"
    assert plain.self_influence(k=3).measure == "whitened"
    with pytest.raises(InvalidInputError, match="4 of 4 columns record no draw.*whitened"):
        plain.topk("test", k=3, measure="nystrom")
    # Black-box draws: nystrom only when asked for (unmeasured on LDS), whitened by default.
    bb = daunce_store.init(tmp_path / "b.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]})
    for k in range(6):
        draw = PerturbationDraw(0, k, 0.5, "blackbox")
        bb.append(f"{k:06d}", train[:, k], {"test": query[:, k]}, metadata={"draw": draw.to_metadata()})
    assert bb.topk("test", k=3, measure="auto").measure == "whitened"
    assert bb.topk("test", k=3).measure == "whitened-corr"
    assert bb.topk("test", k=3, measure="nystrom").measure == "nystrom"


def test_bad_requests_are_clear_errors(linear_store):
    store, *_ = linear_store
    with pytest.raises(InvalidInputError, match="measure must be one of auto, auto-corr, nystrom"):
        store.topk("test", k=3, measure="ifx")
    with pytest.raises(InvalidInputError, match="is 1 for every example"):
        store.self_influence(k=3, measure="nystrom-corr")
    with pytest.raises(InvalidInputError, match="is 1 for every example"):
        store.self_influence(k=3, measure="auto-corr")
    with pytest.raises(InvalidInputError, match="position 24 is out of range.*K=24"):
        store.scores("test", columns=[0, 24])
    with pytest.raises(InvalidInputError, match="aggregate"):
        store.scores("test", aggregate="sum")


def test_cli_measures(linear_store):
    store, train, query, w, _ = linear_store
    runner = CliRunner()
    res = runner.invoke(app, ["topk", store.url, "--query-set", "test", "-k", "3", "--measure", "nystrom-corr", "--format", "json"])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.stdout)  # the server's envelope
    assert answer["measure"] == "nystrom-corr" and answer["num_columns"] == store.num_columns()
    records = answer["records"]
    s, _ = reference(train, query, "nystrom-corr", w)
    assert [r["train_index"] for r in records if r["query"] == "q0" and r["side"] == "pos"] == np.argsort(-s[:, 0], kind="stable")[:3].tolist()
    res = runner.invoke(app, ["self-influence", store.url, "-k", "2", "--measure", "whitened", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["records"][0]["query"] == "<self>"
    res = runner.invoke(app, ["topk", store.url, "--query-set", "test", "--measure", "bogus"])
    assert res.exit_code != 0


def test_cli_scores_streams_the_dense_matrix(linear_store, tmp_path):
    import pandas as pd

    store, *_ = linear_store
    out = tmp_path / "scores.parquet"
    res = CliRunner().invoke(app, ["scores", store.url, "--query-set", "test", "--measure", "nystrom", "-o", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out)
    assert list(table.columns) == ["train_id", "q0", "q1", "q2", "q3"] and table["train_id"].tolist() == store.train_ids.tolist()
    np.testing.assert_array_equal(table[["q0", "q1", "q2", "q3"]].to_numpy(), store.scores("test", measure="nystrom").to_numpy())
    res = CliRunner().invoke(app, ["scores", store.url, "--query-set", "test", "--mean", "-o", str(tmp_path / "m.csv")])
    assert res.exit_code == 0 and pd.read_csv(tmp_path / "m.csv").columns.tolist() == ["train_id", "test:mean"]
    res = CliRunner().invoke(app, ["scores", store.url, "--query-set", "test", "-o", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "unknown output format" in res.output

