"""Convergence diagnostics: nested column subsets and bootstrap standard errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import DaunceStoreError

from _topk_support import exact_scores


@pytest.fixture
def store64(tmp_path):
    """n = 400, K = 64, 3 queries; rows 0..9 share query q0's signal strongly (a stable top-10)."""
    rng = np.random.default_rng(0)
    kc, n = 64, 400
    q = rng.standard_normal((3, kc)).astype(np.float32)
    x = rng.standard_normal((n, kc)).astype(np.float32)
    x[:10] += 3 * q[0]
    store = daunce_store.init(tmp_path / "s.zarr", [f"t{i}" for i in range(n)], {"test": ["q0", "q1", "q2"]}, chunk_rows=128)
    for c in range(kc):
        store.append(f"p{c}", x[:, c], {"test": q[:, c]})
    return store, x, q


def test_full_columns_reproduce_topk_and_subsets_match_their_own_topk(store64, backend):
    store, x, q = store64
    st = store.stability("test", k=10, measure="cov", fractions=(0.25, 0.5), bootstrap=0, backend=backend)
    assert st.columns == (16, 32, 64)
    top = store.topk("test", k=10, measure="cov", backend=backend)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(st.indices[side], top.indices[side])
        np.testing.assert_allclose(st.overlap[side][:, -1], 1.0)
    for f, c in enumerate(st.columns):
        s = exact_scores(x[:, :c], q[:, :c], "cov")
        want = np.argsort(-s, axis=0, kind="stable")[:10].T
        full = st.indices["pos"]
        expect = [len(set(a) & set(b)) / 10 for a, b in zip(want, full)]
        np.testing.assert_allclose(st.overlap["pos"][:, f], expect)
    # The planted rows make q0's list stable already at K/4; q1's random list is not.
    assert st.overlap["pos"][0, 0] == 1.0
    assert st.overlap["pos"][1, 0] < 1.0
    assert np.all(np.isnan(st.stderr["pos"]))


def test_bootstrap_stderr_matches_direct_resampling(store64):
    store, x, q = store64
    st = store.stability("test", ["q0", "q2"], k=5, measure="corr", side="pos", fractions=(1.0,), bootstrap=8, seed=3)
    rng = np.random.default_rng(3)
    reps = []
    for _ in range(8):
        r = np.sort(rng.integers(0, 64, size=64))
        reps.append(exact_scores(x[:, r], q[[0, 2]][:, r], "corr"))
    se = np.std(np.stack(reps), axis=0, ddof=1)  # (n, 2)
    want = np.take_along_axis(se, st.indices["pos"].T, axis=0).T
    np.testing.assert_allclose(st.stderr["pos"], want, rtol=1e-3, atol=1e-6)
    assert 0 < st.bootstrap_overlap["pos"][0] <= 1
    assert st.bootstrap_overlap["pos"][0] > st.bootstrap_overlap["pos"][1]  # planted list is steadier
    df = st.to_pandas()
    assert len(df) == 2 * 5 and {"stderr", "overlap@K=64", "bootstrap_overlap"} <= set(df.columns)
    assert list(st.summary()["query"]) == ["q0", "q2"]


def test_bad_arguments(store64):
    store, _, _ = store64
    for bad in (dict(fractions=()), dict(fractions=(0.0,)), dict(fractions=(1.5,)), dict(bootstrap=-1), dict(k=0)):
        with pytest.raises(DaunceStoreError):
            store.stability("test", **bad)


def test_cli_stability(store64):
    store, _, _ = store64
    runner = CliRunner()
    res = runner.invoke(app, ["stability", store.url, "--query-set", "test", "-k", "4", "--bootstrap", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["summary"]) == 3 * 2 and len(out["records"]) == 3 * 2 * 4
    assert out["summary"][0]["overlap@K=64"] == 1.0
    res = runner.invoke(app, ["stability", store.url, "--query-set", "test", "-k", "4", "--bootstrap", "2"])
    assert res.exit_code == 0 and "stability" in res.output
    res = runner.invoke(app, ["stability", store.url, "--query-set", "nope"])
    assert res.exit_code == 2
