"""Extreme loss values: subnormal losses score finitely (and alike) on every backend and measure, and losses
beyond float32's reach never come back as inf or NaN scores, nor as a wrong "every loss is constant": each
is a finite answer or a clear error.

Subnormal losses are real: a classifier that fits an example with a logit margin of ~90 has a cross-entropy
of ~1e-40. Huge ones too: a diverged fine-tune gave 1e20. Appends refuse |loss| > MAX_ABS_LOSS now
(tests/store/test_bad_input.py); a store written before that check, or by other means, is made here by
writing the column with zarr-python (as tests/store/test_corruption.py does for an inf).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import daunce_store
from daunce_store.errors import DaunceStoreError, DivergedError, InvalidInputError, NotEnoughColumnsError
from daunce_store.scoring import ScoreUnderflowError, available_backends, topk
from daunce_store.scoring._backend import make_accumulator
from daunce_store.scoring._numpy import topk_numpy
from daunce_store.store import PerturbationDraw

from _topk_support import assert_valid_topk, blocks_of, exact_scores

N, M, K = 120, 3, 8
PRECONDITIONED = ("auto", "nystrom", "whitened", "nystrom-corr", "whitened-corr")
OVERFLOW = r"scores of query \d+ overflow float32 \(inf or NaN\).*MAX_ABS_LOSS"


def _subnormal(kind: str, rows: int, seed: int = 0) -> np.ndarray:
    """(rows, K) float32 losses that vary only in subnormals."""
    rng = np.random.default_rng(seed)
    if kind == "tiny":  # every loss ~1e-40, of either sign
        x = rng.standard_normal((rows, K)) * 1e-40
    else:  # ~1e-40, varying by multiples of 1e-42 (a few subnormal steps): many exact ties
        x = 1e-40 + rng.integers(0, 5, (rows, K)) * 1e-42
    x = x.astype(np.float32)
    assert (np.abs(x) < np.finfo(np.float32).tiny).all()
    return x


# --- the kernels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny", "steps"])
@pytest.mark.parametrize("measure", ["cov", "corr"])
def test_subnormal_losses_score_finitely_and_alike(backend: str, measure: str, kind: str) -> None:
    """corr divided each row by a norm whose float32 reciprocal is inf: -inf/NaN scores, an empty top-k
    (numpy), repeated row 0 (rust). Now every backend returns the reference's rows and finite scores, and
    corr's are the true correlations. cov's products of subnormals underflow (every score 0, the lists rows
    0..5 in row order): that is no answer, and every backend says so."""
    x, q = _subnormal(kind, N), _subnormal(kind, M, seed=1)
    if measure == "cov":
        for sides in (("pos", "neg"), ("pos",), ("neg",)):
            with pytest.raises(ScoreUnderflowError, match=r"query 0 .*underflow float32.*--measure corr"):
                topk(blocks_of(x, 50), q, 6, measure, sides=sides, backend=backend)
        return
    got = topk(blocks_of(x, 50), q, 6, measure, backend=backend)
    want = topk_numpy(blocks_of(x, 50), q, 6, measure)
    for side in ("pos", "neg"):
        assert np.isfinite(got[side][1]).all(), (side, got[side][1])
        np.testing.assert_array_equal(got[side][0], want[side][0], err_msg=side)
        np.testing.assert_allclose(got[side][1], want[side][1], rtol=1e-5, atol=1e-6, err_msg=side)
    # the float64 truth: the centered subnormals are exact, the means rounded by < 1 %
    assert_valid_topk(got, exact_scores(x, q, "corr"), 6, tol=2e-2)
    assert np.abs(got["pos"][1]).max() > 0.5  # real correlations, not zeros


def test_subnormal_rows_among_normal_ones(backend: str) -> None:
    """The usual case: a few examples fitted so well that their loss is subnormal under every perturbation."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, K)).astype(np.float32)
    x[[5, 40, 41, 99]] = _subnormal("tiny", 4, seed=4)
    q = rng.standard_normal((M, K)).astype(np.float32)
    for measure in ("cov", "corr"):
        got = topk(blocks_of(x, 32), q, 10, measure, backend=backend)
        want = topk_numpy(blocks_of(x, 32), q, 10, measure)
        for side in got:
            assert np.isfinite(got[side][1]).all()
            np.testing.assert_array_equal(got[side][0], want[side][0])
        assert_valid_topk(got, exact_scores(x, q, measure), 10, tol=1e-5)


@pytest.mark.parametrize("sides", [("pos", "neg"), ("pos",), ("neg",)], ids=["both", "pos", "neg"])
def test_scores_beyond_float32_are_an_error(backend: str, sides: tuple[str, ...]) -> None:
    """Finite losses whose cov scores overflow float32 (+inf at row 37, -inf at row 61 for query 1): an inf
    used to be returned (and printed as the invalid JSON `Infinity`), a NaN silently left out."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 4)).astype(np.float32)
    x[37] = [3e38, -3e38, 0, 0]
    x[61] = [-3e38, 3e38, 0, 0]
    q = np.array([[0, 1, 0, 0], [3e38, -3e38, 0, 0]], np.float32)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(InvalidInputError, match=OVERFLOW.replace(r"\d+", "1")):
        topk(blocks_of(x, 40), q, 3, "cov", sides=sides, backend=backend)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_pushed_scores_that_are_not_finite_are_an_error(backend: str, bad: float) -> None:
    acc = make_accumulator(np.zeros((1, 2), np.float32), 2, "cov", backend=backend, queries_prepared=True)
    with pytest.raises(InvalidInputError, match=OVERFLOW):
        acc.push_scores(0, np.array([1.0, bad, 2.0, 0.5], np.float32))
        acc.finish()


# --- stores --------------------------------------------------------------------------------------------
def _store(path: Path, train: np.ndarray, query: np.ndarray) -> daunce_store.LossStore:
    """A store whose columns record their draws (so ``auto`` is nystrom)."""
    store = daunce_store.init(path, [f"t{i}" for i in range(len(train))], {"test": [f"q{j}" for j in range(len(query))]}, chunk_rows=64)
    for c in range(train.shape[1]):
        store.append(c, train[:, c], {"test": query[:, c]}, metadata={"draw": PerturbationDraw(store.seed, c, 0.5).to_metadata()})
    return store


def _scores(result) -> np.ndarray:
    return np.concatenate([s.ravel() for s in result.scores.values()])


@pytest.mark.parametrize("kind", ["tiny", "steps"])
def test_subnormal_store_every_measure(tmp_path: Path, kind: str) -> None:
    """corr scores finitely on every backend; cov's covariances underflow and it says so (see
    test_subnormal_cov_is_an_error_on_every_path); the preconditioned measures (auto = nystrom here) have
    nothing float32 can invert and say so, not "every loss is constant" (untrue) nor "the draws do not
    match" (also untrue), and point to corr, not to cov (which cannot score these either)."""
    store = _store(tmp_path / "s.zarr", _subnormal(kind, N), _subnormal(kind, M, seed=1))
    for backend in available_backends():
        assert np.isfinite(_scores(store.topk("test", k=5, measure="corr", backend=backend))).all(), backend
        assert np.isfinite(_scores(store.influence("test", k=5, measure="corr", backend=backend))).all()
        with pytest.raises(ScoreUnderflowError):
            store.topk("test", k=5, measure="cov", backend=backend)
        assert np.isfinite(_scores(store.self_influence(k=5, measure="cov", backend=backend))).all()
    assert np.isfinite(store.scores("test", measure="corr").to_numpy()).all()
    for measure in PRECONDITIONED:
        with pytest.raises(InvalidInputError, match=r"vary across the perturbations only by ~1e-19 or less") as info:
            store.topk("test", k=5, measure=measure)
        assert "every train loss is constant" not in str(info.value) and "draws" not in str(info.value)
        assert "--measure corr" in str(info.value) and "cov" not in str(info.value), str(info.value)
    with pytest.raises(InvalidInputError, match="only by ~1e-19"):
        store.self_influence(k=5)


def test_constant_store_says_constant(tmp_path: Path) -> None:
    """Where every loss is the same under every perturbation, both preconditioned measures say so (nystrom
    used to blame the recorded draws)."""
    train = np.tile(np.arange(N, dtype=np.float32)[:, None], (1, K))
    query = np.tile(np.arange(M, dtype=np.float32)[:, None] + 0.5, (1, K))
    store = _store(tmp_path / "s.zarr", train, query)
    for measure in ("auto", "nystrom", "whitened"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConstantQueryWarning: true, and not what is tested here
            with pytest.raises(NotEnoughColumnsError, match="every train loss is constant"):
                store.topk("test", k=5, measure=measure)


@pytest.fixture
def exploded(tmp_path: Path) -> daunce_store.LossStore:
    """A store with one column of a diverged fine-tune (|loss| 1e20, both signs), written past the append
    check as an older version of the package (or a hand edit) could."""
    rng = np.random.default_rng(0)
    train, query = rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal((M, K)).astype(np.float32)
    _store(tmp_path / "s.zarr", train, query)
    group = zarr.open_group(tmp_path / "s.zarr")
    slot = {c.perturbation: c.slot for c in daunce_store.open(tmp_path / "s.zarr").commits()}["000002"]
    group["train/losses"][:, slot] = np.where(train[:, 2] > 0, 1e20, -1e20).astype(np.float32)
    group["queries/test/losses"][:, slot] = np.where(query[:, 2] > 0, 1e20, -1e20).astype(np.float32)
    return daunce_store.open(tmp_path / "s.zarr", mode="r")


def test_exploded_column_under_the_default_measure_is_named(exploded: daunce_store.LossStore) -> None:
    """The default measure's Gram overflowed and read as "every train loss is constant across the
    perturbations" (false). Now: the perturbation, its largest |loss| and what to do."""
    for measure in PRECONDITIONED:
        with pytest.raises(DivergedError) as info:
            exploded.topk("test", k=5, measure=measure)
        message = str(info.value)
        assert "'000002'" in message and "|loss| 1e+20" in message and "columns=" in message, message
        assert "constant" not in message
    with pytest.raises(DivergedError, match="'000002'"):
        exploded.self_influence(k=5)


@pytest.mark.parametrize("backend", ["rust", "numpy"])
def test_exploded_column_under_cov_is_an_error_not_infinity(exploded: daunce_store.LossStore, backend: str) -> None:
    """cov printed `"score": Infinity` ranked by row order; now a clear error, on the fused Rust read path
    and the Python one alike, for top-k, influence and dense scores. corr stays finite (it divides first)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    with pytest.raises(InvalidInputError, match=OVERFLOW):
        exploded.topk("test", k=5, measure="cov", backend=backend)
    with pytest.raises(InvalidInputError, match=OVERFLOW):
        exploded.influence("test", k=5, measure="cov", backend=backend)
    with pytest.raises(InvalidInputError, match=OVERFLOW):
        exploded.scores("test", measure="cov").to_numpy()
    assert np.isfinite(_scores(exploded.topk("test", k=5, measure="corr", backend=backend))).all()


# --- cov's underflow: an error on every path, corr the answer ------------------------------------------
def _subnormal_store(path: Path) -> daunce_store.LossStore:
    """The store of the report: losses ~1e-40 (float32 subnormals) under 8 perturbations, appended without
    draws (black-box columns). cov's covariances are ~1e-81, far below float32 (smallest subnormal 1.4e-45)."""
    rng = np.random.default_rng(0)
    store = daunce_store.init(path, train_ids=[f"t{i}" for i in range(40)], query_sets={"test": ["q0"]})
    for k in range(8):
        store.append(f"p{k}", (rng.random(40) * 1e-40).astype("float32"), {"test": (rng.random(1) * 1e-40).astype("float32")})
    return store


def _float64_reference(store: daunce_store.LossStore, measure: str) -> np.ndarray:
    """(n, 1) scores from the definition, in float64, of the store's stored losses."""
    x = store.train_rows(np.arange(store.n_train)).astype(np.float64)
    return exact_scores(x, store.query_losses("test").astype(np.float64), measure)


UNDERFLOW = r"cov scores of query 'q0' are all 0 or below float32's normal range.*only at ~\de-41.*--measure corr"


def test_subnormal_cov_is_an_error_on_every_backend(tmp_path: Path, backend: str) -> None:
    """`topk --measure cov` scored every row 0.0 (the covariances, ~1e-81, underflow float32) and listed t0,
    t1, t2 in row order as if that were an answer; influence likewise. Now a ScoreUnderflowError naming the
    query, the losses' scale and corr, on every backend and side, through the fused Rust read and the block
    path alike. corr standardizes each row: its ranking is the float64 one."""
    store = _subnormal_store(tmp_path / "sub.zarr")
    truth = _float64_reference(store, "cov")
    assert np.abs(truth).max() > 0 and np.abs(truth).max() < 1e-79  # real covariances, beyond float32
    for side in ("pos", "neg", "both"):
        for columns in (None, list(range(8))):  # None: the fused read (rust); a selection: blocks pushed
            with pytest.raises(ScoreUnderflowError, match=UNDERFLOW) as info:
                store.topk("test", k=3, side=side, measure="cov", backend=backend, columns=columns)
            assert isinstance(info.value, DaunceStoreError) and isinstance(info.value, InvalidInputError)
        with pytest.raises(ScoreUnderflowError, match=r"query 'test:mean' are all 0"):
            store.influence("test", k=3, side=side, measure="cov", backend=backend)
    got = store.topk("test", k=10, measure="corr", backend=backend)
    corr = _float64_reference(store, "corr")
    assert_valid_topk({s: (got.indices[s], got.scores[s]) for s in got.indices}, corr, 10, tol=1e-5)
    for side, order in (("pos", np.argsort(-corr[:, 0], kind="stable")), ("neg", np.argsort(corr[:, 0], kind="stable"))):
        np.testing.assert_array_equal(got.indices[side][0], order[:10], err_msg=side)  # no near-ties here
    assert np.abs(got.scores["pos"]).max() > 0.5


def test_subnormal_cov_is_an_error_on_every_path(tmp_path: Path) -> None:
    """The same refusal from dense scores (nothing written), stability, the torch scorer, the CLI and a
    Dask cluster; the whitened measure's refusal points to corr only (it recommended cov, which cannot work)."""
    from typer.testing import CliRunner

    from daunce_store.cli import app

    store = _subnormal_store(tmp_path / "sub.zarr")
    with pytest.raises(ScoreUnderflowError, match=UNDERFLOW):
        store.scores("test", measure="cov").to_numpy()
    out = tmp_path / "scores.csv"
    with pytest.raises(ScoreUnderflowError):
        store.scores("test", measure="cov").write(out)
    assert not out.exists()
    np.testing.assert_allclose(store.scores("test", measure="corr").to_numpy(), _float64_reference(store, "corr"), atol=1e-5)
    with pytest.raises(ScoreUnderflowError, match=UNDERFLOW):
        store.stability("test", k=3, measure="cov", bootstrap=2)
    if "torch" in available_backends():
        scorer = store.scorer("test", measure="cov", device="cpu")
        with pytest.raises(ScoreUnderflowError, match=UNDERFLOW):
            scorer.topk(k=3)
        with pytest.raises(ScoreUnderflowError, match=r"query 'mine' are all 0"):
            scorer.topk_losses(store.query_losses("test"), k=3, names=["mine"])

    runner = CliRunner()
    result = runner.invoke(app, ["topk", str(tmp_path / "sub.zarr"), "--query-set", "test", "-k", "3", "--side", "pos",
                                 "--measure", "cov", "--format", "json"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "underflow float32" in text and "--measure corr" in text and '"score"' not in text, result.output
    result = runner.invoke(app, ["topk", str(tmp_path / "sub.zarr"), "--query-set", "test", "-k", "3", "--measure", "whitened"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "--measure corr" in text and "cov" not in text, result.output
    result = runner.invoke(app, ["topk", str(tmp_path / "sub.zarr"), "--query-set", "test", "-k", "3", "--side", "pos",
                                 "--measure", "corr", "--format", "json"])
    assert result.exit_code == 0 and '"train_id":"t17"' in result.stdout.replace(" ", ""), result.output

    distributed = pytest.importorskip("distributed")
    from daunce_store.scoring import topk_store

    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with pytest.raises(ScoreUnderflowError, match=UNDERFLOW):
            topk_store(store, "test", k=3, measure="cov", client=client, partition_rows=16)
        got = topk_store(store, "test", k=5, measure="corr", client=client, partition_rows=16)
    np.testing.assert_array_equal(got.indices["pos"], store.topk("test", k=5, measure="corr").indices["pos"])


def test_cov_underflow_check_leaves_real_answers_alone(backend: str) -> None:
    """Normal losses come back bit for bit as the accumulator gives them; so does a constant query (all 0,
    which ConstantQueryWarning explains), and a subnormal query is ranked where some train rows vary enough
    for their covariances with it to be normal floats. Train losses ~1e-40 against an ordinary query underflow
    as well: the error then blames the train losses' scale, not the query's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, K)).astype(np.float32)
    q = rng.standard_normal((M, K)).astype(np.float32)
    q[2] = 0.25  # constant
    for measure in ("cov", "corr"):
        got = topk(blocks_of(x, 32), q, 7, measure, backend=backend)
        acc = make_accumulator(q, 7, measure, backend=backend)
        for offset, block in blocks_of(x, 32):
            acc.push_block(offset, block)
        want = acc.finish()
        for side in ("pos", "neg"):
            np.testing.assert_array_equal(got[side][0], want[side][0])
            np.testing.assert_array_equal(got[side][1], want[side][1])  # the same bits
    assert_valid_topk(topk(blocks_of(x, 32), q[:2], 7, "cov", backend=backend), exact_scores(x, q[:2], "cov"), 7, tol=1e-5)
    # A subnormal query: rows 3 and 50 vary at ~1e8, so their covariances with it (~1e-33) are normal floats.
    x[[3, 50]] *= np.float32(1e8)
    sub = _subnormal("tiny", 1, seed=6)
    truth = exact_scores(x, sub, "cov")[:, 0]
    got = topk(blocks_of(x, 32), sub, 1, "cov", backend=backend)
    assert got["pos"][0][0, 0] == int(np.argmax(truth)) and got["neg"][0][0, 0] == int(np.argmin(truth))
    np.testing.assert_allclose([got["pos"][1][0, 0], got["neg"][1][0, 0]], [truth.max(), truth.min()], rtol=1e-3)
    with pytest.raises(ScoreUnderflowError, match=r"query 0 .*losses vary at ~\d.*train losses vary across the perturbations only at"):
        topk(blocks_of(_subnormal("tiny", N), 40), x[:1], 5, "cov", sides=("pos",), backend=backend)
