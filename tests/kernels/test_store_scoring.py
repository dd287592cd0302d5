"""Scoring a real on-disk store through every backend: top-k, aggregate influence, self-influence,
and the memory bound of streaming (peak RSS far below the store size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from _topk_support import assert_valid_topk, exact_scores, expected_topk


def test_store_topk_every_backend(small_store, backend):
    store, train, query = small_store
    for measure in ("cov", "corr"):
        res = store.topk("test", k=7, measure=measure, backend=backend)
        got = {s: (res.indices[s], res.scores[s].astype(np.float32)) for s in ("pos", "neg")}
        assert_valid_topk(got, exact_scores(train, query, measure), 7, 1e-5)


def test_influence_is_topk_of_mean_score(small_store, backend):
    store, train, query = small_store
    for measure in ("cov", "corr"):
        res = store.influence("test", ["q1", "q4", "q5"], k=9, measure=measure, backend=backend)
        s = exact_scores(train, query[[1, 4, 5]], measure).mean(axis=1, keepdims=True)
        got = {side: (res.indices[side], res.scores[side]) for side in ("pos", "neg")}
        assert_valid_topk(got, s, 9, 1e-5)
        assert res.queries == ("test:mean-of-3",)


def test_self_influence_is_row_variance(small_store, backend):
    store, train, _ = small_store
    var = train.astype(np.float64).var(axis=1, ddof=1)[:, None]
    res = store.self_influence(k=12, side="both", measure="cov", backend=backend, block_rows=64)
    for side in ("pos", "neg"):
        want_idx, want_sc = expected_topk(var, 12, side)
        np.testing.assert_array_equal(res.indices[side], want_idx)
        np.testing.assert_allclose(res.scores[side], want_sc, rtol=1e-5)


def test_self_influence_ties_go_to_lower_index(tmp_path, backend):
    import daunce_store

    rng = np.random.default_rng(0)
    train = rng.integers(0, 3, size=(500, 4)).astype(np.float32)  # few distinct variances: many ties
    store = daunce_store.init(tmp_path / "t.zarr", [f"t{i}" for i in range(500)], chunk_rows=64)
    for c in range(4):
        store.append(f"p{c}", train[:, c])
    var = train.astype(np.float64).var(axis=1, ddof=1)[:, None]
    res = store.self_influence(k=40, side="both", measure="cov", backend=backend, block_rows=100)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(res.indices[side], expected_topk(var, 40, side)[0])


MEMORY_SCRIPT = """
import json, sys, threading, time
import numpy as np, psutil
import daunce_store
store = daunce_store.open(sys.argv[1], mode="r")
proc = psutil.Process()
q = store.query_losses("test")
store.topk("test", k=5, measure="cov", backend=sys.argv[2], block_rows=1024)  # warm up (numba compiles, pools start)
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
res = store.topk("test", k=100, measure="cov", backend=sys.argv[2], block_rows=65536)
done.set(); t.join()
print(json.dumps({"base": base, "peak": peak[0], "first": int(res.indices["pos"][0, 0])}))
"""


def test_streaming_memory_stays_far_below_store_size(tmp_path: Path):
    # n = 2M rows × K = 16 float32 = 128 MB of losses, read in blocks of 65536 rows (4 MB).
    import daunce_store

    n, kc = 2_000_000, 16
    rng = np.random.default_rng(0)
    store = daunce_store.init(tmp_path / "big.zarr", np.arange(n).astype(str), {"test": ["a", "b", "c"]}, capacity=kc)
    for c in range(kc):
        store.append(f"p{c}", rng.standard_normal(n, dtype=np.float32), {"test": rng.standard_normal(3, dtype=np.float32)})
    losses_bytes = n * kc * 4
    backends = ["rust"] if not os.environ.get("DAUNCE_STORE_NO_EXT") else ["numba"]
    for backend in backends:
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big.zarr"), backend],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        growth = out["peak"] - out["base"]
        print(f"{backend}: peak RSS grew {growth / 1e6:.0f} MB over {losses_bytes / 1e6:.0f} MB of losses")
        assert growth < losses_bytes / 4, f"{backend}: peak RSS grew {growth / 1e6:.0f} MB scoring a {losses_bytes / 1e6:.0f} MB store"


def test_constant_query_warns(tmp_path):
    """A query with the same loss under every perturbation scores 0 against everything; that used to list
    arbitrary rows as both proponents and opponents without a word."""
    import warnings

    import pytest
    from typer.testing import CliRunner

    import daunce_store

    from daunce_store.cli import app
    from daunce_store.errors import ConstantQueryWarning

    rng = np.random.default_rng(0)
    s = daunce_store.init(tmp_path / "s.zarr", [f"t{i}" for i in range(30)], {"test": ["live", "flat"]})
    for k in range(4):
        s.append(f"p{k}", rng.standard_normal(30), {"test": [rng.standard_normal(), 1.5]})
    with pytest.warns(ConstantQueryWarning, match=r"1 query has the same loss under all K=4 perturbations \('flat'\)"):
        s.topk("test", k=3, measure="cov")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.topk("test", ["live"], k=3, measure="cov")  # a live query alone: no warning
    out = CliRunner().invoke(app, ["topk", str(tmp_path / "s.zarr"), "--query-set", "test", "-k", "2", "--measure", "cov"])
    assert out.exit_code == 0
    assert "warning (ConstantQueryWarning)" in out.output and "'flat'" in out.output
