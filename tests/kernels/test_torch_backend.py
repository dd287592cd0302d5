"""The torch backend: streaming (``backend="torch"``) and resident (``TorchScorer``, ``Store.scorer``) give
the numpy reference's indices and scores, on CPU here and on CUDA where there is a GPU (``-m gpu``).

The shared kernel tests (``test_topk.py``, ``test_topk_properties.py``, the store scoring tests) also run
torch through the ``backend`` fixture, on its default device (cuda when available)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from daunce_store.errors import InvalidInputError
from daunce_store.scoring import topk
from daunce_store.scoring._backend import available_backends, make_accumulator
from daunce_store.scoring._numpy import prepare_queries, topk_numpy

from _topk_support import assert_same_topk, assert_valid_topk, blocks_of, exact_scores, expected_topk

torch = pytest.importorskip("torch")
from daunce_store.scoring import _torch  # noqa: E402
from daunce_store.scoring._torch import TorchScorer  # noqa: E402

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])
DEVICES = ["cpu", CUDA]


def _random(n: int, m: int, kc: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((3, kc))
    x = (rng.standard_normal((n, 3)) @ latent + rng.standard_normal((n, kc))).astype(np.float32)
    q = (rng.standard_normal((m, 3)) @ latent + rng.standard_normal((m, kc))).astype(np.float32)
    return x, q


def _uneven_blocks(x: np.ndarray, seed: int = 0):
    """Blocks of random uneven sizes (1 row .. 700), an empty one, in shuffled order."""
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.r_[0, np.cumsum(rng.integers(1, 700, size=len(x))), len(x)].clip(0, len(x)))
    pieces = [(int(a), np.ascontiguousarray(x[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    pieces.append((len(x), np.empty((0, x.shape[1]), np.float32)))
    rng.shuffle(pieces)
    return pieces


def _resident(x: np.ndarray, q: np.ndarray, k: int, measure: str, device: str, sides=("pos", "neg"), **kw):
    return TorchScorer.from_blocks(blocks_of(x, 1000), measure, device=device).topk(q, k, sides, **kw)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 256 rows, so one block is scored in many tiles and most tiles take the cut (step 2)."""
    monkeypatch.setitem(_torch._TILE_VALUES, "cpu", 1)
    monkeypatch.setitem(_torch._TILE_VALUES, "cuda", 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("measure", ["cov", "corr"])
@pytest.mark.parametrize(("n", "m", "kc", "k"), [(5000, 4, 16, 20), (900, 1, 5, 900), (3000, 30, 64, 150)])
def test_streamed_and_resident_match_reference(device, measure, n, m, kc, k):
    x, q = _random(n, m, kc, seed=n + kc)
    s = exact_scores(x, q, measure)
    tol = 1e-5 * float(np.abs(s).max())
    want = topk_numpy(blocks_of(x, 512), q, k, measure)
    got = topk(_uneven_blocks(x, seed=n), q, k, measure, backend="torch", device=device)
    assert_valid_topk(got, s, k, tol)
    assert_same_topk(got, want, s, tol)
    if "rust" in available_backends():
        assert_same_topk(got, topk(blocks_of(x, 700), q, k, measure, backend="rust"), s, tol)
    resident = _resident(x, q, k, measure, device)
    assert_same_topk(resident, got, s, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sides", [("pos",), ("neg",), ("pos", "neg")])
def test_sides_and_many_tiles(device, sides, small_tiles):
    x, q = _random(4000, 9, 12, seed=3)
    s = exact_scores(x, q, "cov")
    tol = 1e-5 * float(np.abs(s).max())
    got = topk(blocks_of(x, 1500), q, 40, "cov", sides, backend="torch", device=device)
    assert set(got) == set(sides)
    assert_same_topk(got, topk_numpy(blocks_of(x, 1500), q, 40, "cov", sides), s, tol)
    assert_same_topk(_resident(x, q, 40, "cov", device, sides), got, s, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_rising_rows_take_the_cut_every_block(device, small_tiles):
    """Rows in rising order of score: every row of every tile beats the running k-th (step 2 each time)."""
    rng = np.random.default_rng(7)
    direction = rng.standard_normal(10).astype(np.float32)
    x = np.ascontiguousarray(np.linspace(-3, 3, 3000, dtype=np.float32)[:, None] * direction)
    q = direction[None, :]
    s = exact_scores(x, q, "cov")
    got = topk(blocks_of(x, 300), q, 25, "cov", backend="torch", device=device)
    want = topk_numpy(blocks_of(x, 300), q, 25, "cov")
    assert_same_topk(got, want, s, 1e-5 * float(np.abs(s).max()))
    assert set(got["pos"][0][0].tolist()) == set(range(2975, 3000))
    assert set(got["neg"][0][0].tolist()) == set(range(25))


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_go_to_lower_index(device, small_tiles):
    # Small integers, K = 8, queries in multiples of 56: every step is exact in float32 on any device and
    # in any summation order, so ties are real ties (test_topk's argument).
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(3000, 8)).astype(np.float32)
    q = (56 * rng.integers(-2, 3, size=(4, 8))).astype(np.float32)
    s = exact_scores(x, q, "cov")
    scorer = TorchScorer.from_blocks(_uneven_blocks(x, seed=2), "cov", device=device)
    for k in (1, 17, 400, 3000):
        for got in (topk(_uneven_blocks(x, seed=k), q, k, "cov", backend="torch", device=device), scorer.topk(q, k)):
            for side in ("pos", "neg"):
                want_idx, want_sc = expected_topk(s, k, side)
                np.testing.assert_array_equal(got[side][0], want_idx)
                np.testing.assert_array_equal(got[side][1], want_sc.astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_constant_rows_and_queries(device):
    x, q = _random(300, 2, 6)
    x[::3] = 4.25
    x[1::3] = -1e6
    for measure in ("cov", "corr"):
        for got in (topk(blocks_of(x, 64), q, 300, measure, backend="torch", device=device), _resident(x, q, 300, measure, device)):
            for side in ("pos", "neg"):
                idx, sc = got[side]
                assert np.all(sc[np.isin(idx, np.r_[0:300:3, 1:300:3])] == 0.0)
    const = np.full((1, 6), 2.0, np.float32)
    for got in (topk(blocks_of(x, 64), const, 5, "corr", backend="torch", device=device), _resident(x, const, 5, "corr", device)):
        for side in ("pos", "neg"):
            np.testing.assert_array_equal(got[side][0], [[0, 1, 2, 3, 4]])
            np.testing.assert_array_equal(got[side][1], np.zeros((1, 5), np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_negative_and_huge_values(device):
    rng = np.random.default_rng(3)
    x = (-(10.0 ** rng.uniform(-30, 30, size=(2000, 1))) * (1 + rng.standard_normal((2000, 10)))).astype(np.float32)
    q = rng.standard_normal((3, 10)).astype(np.float32)
    for measure in ("cov", "corr"):
        s = exact_scores(x, q, measure)
        want = topk_numpy(blocks_of(x, 256), q, 20, measure)
        for got in (topk(blocks_of(x, 256), q, 20, measure, backend="torch", device=device), _resident(x, q, 20, measure, device)):
            for side in ("pos", "neg"):
                np.testing.assert_array_equal(got[side][0], want[side][0])
                np.testing.assert_allclose(got[side][1], want[side][1], rtol=1e-4, atol=1e-6 if measure == "corr" else 0)
                exact = s[got[side][0].T, np.arange(3)].T
                np.testing.assert_allclose(got[side][1], exact, rtol=1e-4, atol=1e-6 if measure == "corr" else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_prepared_queries_and_duplicated_rows(device):
    base, q = _random(40, 6, 12, seed=11)
    x = base[np.random.default_rng(2).integers(0, len(base), size=2500)]
    for measure in ("cov", "corr"):
        mean_q = prepare_queries(q, measure).mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
        s = exact_scores(x, q, measure).mean(axis=1, keepdims=True)
        tol = 1e-5 * float(np.abs(s).max())
        got = topk(blocks_of(x, 500), mean_q, 60, measure, backend="torch", queries_prepared=True, device=device)
        assert_valid_topk(got, s, 60, tol)
        assert_same_topk(_resident(x, mean_q, 60, measure, device, queries_prepared=True), got, s, tol)
        for side in ("pos", "neg"):  # inside each run of equal scores the rows ascend
            idx, sc = got[side]
            same = sc[:, 1:] == sc[:, :-1]
            assert same.any() and np.all(idx[:, 1:][same] > idx[:, :-1][same])


@pytest.mark.parametrize("device", DEVICES)
def test_pushed_scores(device):
    v = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.float32)
    acc = make_accumulator(np.zeros((1, 2), np.float32), 100, backend="torch", queries_prepared=True, device=device)
    for off in range(0, 5000, 700):
        acc.push_scores(off, v[off : off + 700])
    got = acc.finish()
    for side in ("pos", "neg"):
        want_idx, want_sc = expected_topk(v[:, None].astype(np.float64), 100, side)
        np.testing.assert_array_equal(got[side][0], want_idx)
        np.testing.assert_array_equal(got[side][1], want_sc.astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_caller_may_reuse_its_block_buffer(device):
    """A block is scored on the next push (pipelining), but push_block keeps no reference to the caller's array."""
    x, q = _random(2000, 3, 8, seed=5)
    acc = make_accumulator(q, 15, "corr", backend="torch", device=device)
    buf = np.empty((500, 8), np.float32)
    for r0 in range(0, 2000, 500):
        buf[:] = x[r0 : r0 + 500]
        acc.push_block(r0, buf)
    buf[:] = 0.0
    s = exact_scores(x, q, "corr")
    assert_same_topk(acc.finish(), topk_numpy(blocks_of(x, 500), q, 15, "corr"), s, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_flag_is_restored(device):
    mm = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"
    before = getattr(mm, name)
    x, q = _random(500, 2, 8)
    for allow in (False, True):
        got = topk(blocks_of(x, 128), q, 5, "corr", backend="torch", device=device, allow_tf32=allow)
        assert_valid_topk(got, exact_scores(x, q, "corr"), 5, 1e-2 if allow else 1e-5)
        assert getattr(mm, name) == before


def test_errors():
    x, q = _random(10, 2, 4)
    with pytest.raises(InvalidInputError, match="exceeds the number of rows"):
        topk(blocks_of(x, 4), q, 11, backend="torch", device="cpu")
    with pytest.raises(InvalidInputError, match="columns"):
        topk(blocks_of(x[:, :3], 4), q, 2, backend="torch", device="cpu")
    with pytest.raises(InvalidInputError, match="backend='torch'"):
        make_accumulator(q, 2, backend="numpy", device="cpu")
    scorer = TorchScorer.from_blocks(blocks_of(x, 4), "cov", device="cpu")
    with pytest.raises(InvalidInputError, match="exceeds the number of rows"):
        scorer.topk(q, 11)
    with pytest.raises(InvalidInputError, match=r"\(m, 4\)"):
        scorer.topk(q[:, :3], 2)
    with pytest.raises(InvalidInputError, match="gaps"):
        TorchScorer.from_blocks([(0, x[:4]), (5, x[5:])], "cov", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA GPU"):
            topk(blocks_of(x, 4), q, 2, backend="torch", device="cuda")


def test_auto_never_picks_torch():
    assert "torch" in available_backends() and available_backends()[-1] == "torch"
    assert available_backends()[0] != "torch"


@pytest.mark.parametrize("device", DEVICES)
def test_store_scorer_matches_streaming(small_store, device):
    store, train, query = small_store
    for measure in ("cov", "corr", "whitened", "whitened-corr"):
        scorer = store.scorer("test", measure=measure, device=device, block_rows=100)
        for kwargs in ({}, {"queries": ["q1", "q5"]}, {"aggregate": "mean"}):
            queries = kwargs.pop("queries", None)
            got = scorer.topk(queries, k=9, **kwargs)
            if kwargs:
                want = store.influence("test", queries, k=9, measure=measure, backend="numpy")
            else:
                want = store.topk("test", queries, k=9, measure=measure, backend="numpy")
            streamed = store.topk("test", queries, k=9, measure=measure, backend="torch") if not kwargs else want
            assert got.queries == want.queries and got.measure == want.measure
            for side in ("pos", "neg"):
                np.testing.assert_array_equal(got.indices[side], want.indices[side])
                np.testing.assert_array_equal(got.indices[side], streamed.indices[side])
                np.testing.assert_allclose(got.scores[side], want.scores[side], rtol=1e-4, atol=1e-6)
        fresh = scorer.topk_losses(query[[2, 0]], k=4, side="pos", names=["a", "b"])
        want = store.topk("test", ["q2", "q0"], k=4, measure=measure, side="pos", backend="numpy")
        np.testing.assert_array_equal(fresh.indices["pos"], want.indices["pos"])
        assert fresh.queries == ("a", "b")
    sub = store.scorer("test", measure="cov", device=device, columns=[0, 2, 4, 6])
    got = sub.topk(["q1"], k=3, side="pos")
    want = store.topk("test", ["q1"], k=3, measure="cov", side="pos", columns=[0, 2, 4, 6], backend="numpy")
    np.testing.assert_array_equal(got.indices["pos"], want.indices["pos"])
    with pytest.raises(InvalidInputError, match=r"\(m, 4\)"):
        sub.topk_losses(query, k=3)


def test_scorer_without_query_set(small_store):
    store, train, query = small_store
    scorer = store.scorer(measure="cov", device="cpu")
    got = scorer.topk_losses(query[:2], k=5)
    want = store.topk("test", ["q0", "q1"], k=5, measure="cov", backend="numpy")
    np.testing.assert_array_equal(got.indices["pos"], want.indices["pos"])
    with pytest.raises(InvalidInputError, match="without a query set"):
        scorer.topk(["q0"], k=5)


WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # as if torch were not installed
import numpy as np
import daunce_store
from daunce_store.errors import MissingDependencyError
from daunce_store.scoring import available_backends, topk
x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
out = {"backends": available_backends(), "auto": topk([(0, x)], x[:2], 3)["pos"][0].tolist()}
try:
    topk([(0, x)], x[:2], 3, backend="torch")
except MissingDependencyError as e:
    out["error"] = str(e)
store = daunce_store.init(sys.argv[1], [f"t{i}" for i in range(50)], {"test": ["a", "b"]})
for c in range(4):
    store.append(f"p{c}", x[:, c], {"test": x[:2, c]})
out["store"] = store.topk("test", k=2, measure="cov").indices["pos"].tolist()
try:
    store.scorer("test")
except MissingDependencyError as e:
    out["scorer_error"] = str(e)
print(json.dumps(out))
"""


def test_scoring_and_store_run_without_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(tmp_path / "s.zarr")], capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "torch" not in out["backends"]
    assert len(out["auto"]) == 2 and len(out["store"]) == 2
    for key in ("error", "scorer_error"):
        assert "daunce-store[torch]" in out[key]


def test_auto_scoring_does_not_import_torch():
    code = ("import sys, numpy as np; from daunce_store.scoring import topk; x = np.eye(6, dtype=np.float32); "
            "topk([(0, x)], x[:1], 2); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
