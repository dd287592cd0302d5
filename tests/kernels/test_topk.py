"""The streaming top-k kernel: every backend against exact scores and against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from daunce_store.errors import DaunceStoreError, InvalidInputError
from daunce_store.scoring import topk
from daunce_store.scoring._backend import make_accumulator
from daunce_store.scoring._numpy import prepare_queries, topk_numpy

from _topk_support import assert_same_topk, assert_valid_topk, blocks_of, exact_scores, expected_topk


def _random(n: int, m: int, kc: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((3, kc))
    x = (rng.standard_normal((n, 3)) @ latent + rng.standard_normal((n, kc))).astype(np.float32)
    q = (rng.standard_normal((m, 3)) @ latent + rng.standard_normal((m, kc))).astype(np.float32)
    return x, q


@pytest.mark.parametrize("measure", ["cov", "corr"])
@pytest.mark.parametrize(("n", "m", "kc", "k", "rows"), [(3000, 5, 16, 10, 512), (1000, 1, 7, 1, 1000), (777, 3, 64, 777, 100), (2500, 40, 33, 250, 999)])
def test_random_matches_exact_and_reference(backend, measure, n, m, kc, k, rows):
    x, q = _random(n, m, kc, seed=n)
    s = exact_scores(x, q, measure)
    tol = 1e-5 * float(np.abs(s).max())
    got = topk(blocks_of(x, rows), q, k, measure, backend=backend)
    assert_valid_topk(got, s, k, tol)
    assert_same_topk(got, topk_numpy(blocks_of(x, rows), q, k, measure), s, tol)


@pytest.mark.parametrize("measure", ["cov", "corr"])
def test_one_side_only(backend, measure):
    x, q = _random(500, 3, 8)
    s = exact_scores(x, q, measure)
    for side in ("pos", "neg"):
        got = topk(blocks_of(x, 128), q, 7, measure, sides=(side,), backend=backend)
        assert set(got) == {side}
        assert_valid_topk(got, s, 7, 1e-5)


def test_constant_rows_score_zero(backend):
    x, q = _random(200, 2, 6)
    x[::3] = 4.25  # every third row constant: cov and corr are exactly 0 for it
    x[1::3] = -1e6
    for measure in ("cov", "corr"):
        k = 200
        got = topk(blocks_of(x, 64), q, k, measure, backend=backend)
        for side in ("pos", "neg"):
            idx, sc = got[side]
            const = np.isin(idx, np.r_[0:200:3, 1:200:3])
            assert np.all(sc[const] == 0.0)
    # A constant query: every correlation is 0, so the top-k is rows 0..k-1 on both sides.
    got = topk(blocks_of(x, 64), np.full((1, 6), 2.0, np.float32), 5, "corr", backend=backend)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(got[side][0], [[0, 1, 2, 3, 4]])
        np.testing.assert_array_equal(got[side][1], np.zeros((1, 5), np.float32))


def test_integer_losses_tie_exactly_to_lower_index(backend):
    # Small integers, K = 8 and queries in multiples of 56: every step of every backend is exact in
    # float32 (means are multiples of 1/8, the 1/(K-1) divides exactly), so ties are real ties.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(3000, 8)).astype(np.float32)
    q = (56 * rng.integers(-2, 3, size=(4, 8))).astype(np.float32)
    s = exact_scores(x, q, "cov")
    for k in (1, 17, 400):
        got = topk(blocks_of(x, 333), q, k, "cov", backend=backend)
        for side in ("pos", "neg"):
            want_idx, want_sc = expected_topk(s, k, side)
            np.testing.assert_array_equal(got[side][0], want_idx)
            np.testing.assert_array_equal(got[side][1], want_sc.astype(np.float32))


@pytest.mark.parametrize("measure", ["cov", "corr"])
def test_duplicated_rows_tie_to_lower_index(backend, measure):
    base, q = _random(40, 3, 12, seed=5)
    rng = np.random.default_rng(2)
    which = rng.integers(0, len(base), size=2000)
    x = base[which]
    got = topk(blocks_of(x, 300), q, 60, measure, backend=backend)
    want = topk_numpy(blocks_of(x, 300), q, 60, measure)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(got[side][0], want[side][0])
        # Inside each run of equal scores the rows ascend.
        idx, sc = got[side]
        same = sc[:, 1:] == sc[:, :-1]
        assert np.all(idx[:, 1:][same] > idx[:, :-1][same])
        assert same.any()


def test_extreme_scales(backend):
    rng = np.random.default_rng(3)
    n, kc = 2000, 10
    x = (rng.standard_normal((n, kc)) * 10.0 ** rng.uniform(-30, 30, size=(n, 1))).astype(np.float32)
    q = rng.standard_normal((3, kc)).astype(np.float32)
    for measure in ("cov", "corr"):
        s = exact_scores(x, q, measure)
        got = topk(blocks_of(x, 256), q, 20, measure, backend=backend)
        want = topk_numpy(blocks_of(x, 256), q, 20, measure)
        for side in ("pos", "neg"):
            np.testing.assert_array_equal(got[side][0], want[side][0])
            np.testing.assert_allclose(got[side][1], want[side][1], rtol=1e-4, atol=0)
            np.testing.assert_allclose(got[side][1], s[got[side][0].T, np.arange(3)].T, rtol=1e-4, atol=1e-6 if measure == "corr" else 0)
    # Tiny queries against tiny rows (corr is scale-free).
    got = topk(blocks_of(x * np.float32(1e-8), 256), q * np.float32(1e-30), 5, "corr", backend=backend)
    assert_valid_topk(got, exact_scores(x, q, "corr"), 5, 1e-5)


def test_large_k(backend):
    x, q = _random(30000, 2, 8, seed=9)
    s = exact_scores(x, q, "cov")
    got = topk(blocks_of(x, 4096), q, 12000, "cov", backend=backend)
    assert_valid_topk(got, s, 12000, 1e-5 * float(np.abs(s).max()))


def test_many_queries(backend):
    x, q = _random(600, 10_500, 6, seed=4)
    s = exact_scores(x, q, "corr")
    got = topk(blocks_of(x, 256), q, 3, "corr", backend=backend)
    assert_valid_topk(got, s, 3, 1e-5)


def test_blocks_in_any_order_and_sizes(backend):
    x, q = _random(1000, 4, 9, seed=8)
    s = exact_scores(x, q, "cov")
    tol = 1e-5 * float(np.abs(s).max())
    pieces = list(blocks_of(x, 97))[::-1] + [(1000, np.empty((0, 9), np.float32))]
    acc = make_accumulator(q, 30, "cov", backend=backend)
    for off, b in pieces:
        acc.push_block(off, b)
    got = acc.finish()
    assert_valid_topk(got, s, 30, tol)
    assert_same_topk(got, topk_numpy(blocks_of(x, 1000), q, 30, "cov"), s, tol)


def test_prepared_queries_give_aggregate_influence(backend):
    x, q = _random(1500, 6, 12, seed=11)
    for measure in ("cov", "corr"):
        mean_q = prepare_queries(q, measure).mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
        s = exact_scores(x, q, measure).mean(axis=1, keepdims=True)
        got = topk(blocks_of(x, 500), mean_q, 25, measure, backend=backend, queries_prepared=True)
        assert_valid_topk(got, s, 25, 1e-5 * float(np.abs(s).max()))


def test_pushed_scores_select_like_scores(backend):
    rng = np.random.default_rng(0)
    v = rng.integers(0, 50, size=5000).astype(np.float32)
    acc = make_accumulator(np.zeros((1, 2), np.float32), 100, backend=backend, queries_prepared=True)
    for off in range(0, 5000, 700):
        acc.push_scores(off, v[off : off + 700])
    got = acc.finish()
    for side in ("pos", "neg"):
        want_idx, want_sc = expected_topk(v[:, None].astype(np.float64), 100, side)
        np.testing.assert_array_equal(got[side][0], want_idx)
        np.testing.assert_array_equal(got[side][1], want_sc.astype(np.float32))


def test_bad_input_raises_our_errors(backend):
    x, q = _random(10, 2, 4)
    with pytest.raises(InvalidInputError, match="exceeds the number of rows"):
        topk(blocks_of(x, 4), q, 11, backend=backend)
    with pytest.raises(InvalidInputError, match="columns"):
        topk(blocks_of(x[:, :3], 4), q, 2, backend=backend)
    for bad in (dict(k=0), dict(k=2, measure="spearman"), dict(k=2, sides=("up",))):
        with pytest.raises(DaunceStoreError):
            topk(blocks_of(x, 4), q, backend=backend, **bad)
    with pytest.raises(InvalidInputError, match="backend"):
        topk(blocks_of(x, 4), q, 2, backend="cuda")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_passed_blocks_is_named_by_row(backend, bad):
    x, q = _random(300, 2, 8)
    x[217, 3] = bad
    with pytest.raises(InvalidInputError, match=r"train losses hold NaN or inf \(row 217\)"):
        topk(blocks_of(x, 100), q, 5, "cov", backend=backend)


def test_huge_finite_losses_are_not_taken_for_inf(backend):
    """The cheap finiteness test (a block's float32 sum) overflows on huge finite values; the exact test
    then decides, and the answer matches the reference."""
    x, q = _random(256, 2, 8)
    x[:, :4] *= np.float32(3e37)  # finite, but the block sums to inf
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(x.sum()) and np.isfinite(x).all()
    got = topk(blocks_of(x, 256), q, 5, "corr", backend=backend)
    want = topk_numpy(blocks_of(x, 256), q, 5, "corr")
    np.testing.assert_array_equal(got["pos"][0], want["pos"][0])


# --- per-row score factors (the -corr measures' persisted row scales) -------------------------------------
def _scaled_topk(x: np.ndarray, q: np.ndarray, k: int, scales: np.ndarray, backend: str, rows: int) -> dict:
    """Top-k of cov scores times each row's scale, blocks pushed last first."""
    acc = make_accumulator(q, k, "cov", ("pos", "neg"), backend)
    acc.set_row_scales(scales)
    for offset, block in reversed(list(blocks_of(x, rows))):
        acc.push_block(offset, block)
    return acc.finish()


def _row_scale_backend(backend: str) -> str:
    from daunce_store.scoring._backend import accumulator_class

    if not accumulator_class(backend).takes_row_scales:
        pytest.skip(f"{backend} scores the -corr measures through the per-block transform, not row scales")
    return backend


@pytest.mark.parametrize(("n", "m", "kc", "k", "rows"), [(3000, 5, 16, 10, 512), (1000, 1, 7, 1, 1000), (2500, 40, 33, 250, 999)])
def test_row_scales_match_exact_and_reference(backend, n, m, kc, k, rows):
    _row_scale_backend(backend)
    x, q = _random(n, m, kc, seed=n)
    scales = np.random.default_rng(n).uniform(0.05, 4.0, n).astype(np.float32)
    s = exact_scores(x, q, "cov") * scales[:, None]
    tol = 1e-5 * float(np.abs(s).max())
    got = _scaled_topk(x, q, k, scales, backend, rows)
    assert_valid_topk(got, s, k, tol)
    assert_same_topk(got, _scaled_topk(x, q, k, scales, "numpy", rows), s, tol)


def test_row_scales_on_adversarial_rows_agree_exactly_in_indices(backend):
    """Constant rows (score 0 whatever the scale), a zero-spread row with scale 0, huge and tiny scales on
    rows of tiny and huge spread (products of order 1), duplicated rows with equal scales (ties to the lower
    index): every backend lists the reference's indices exactly, scores to float32 rounding."""
    _row_scale_backend(backend)
    x, q = _random(600, 4, 12, seed=3)
    scales = np.random.default_rng(3).uniform(0.5, 2.0, len(x)).astype(np.float32)
    x[::50] = 7.0  # constant rows
    scales[::100] = 0.0  # ... some of them with scale 0
    x[13] = 1.0 + 1e-30 * x[14]  # no spread in float32: its centered row is 0
    scales[13] = 0.0
    x[21] = (x[22] * 1e-25).astype(np.float32)
    scales[21] = 1e25
    x[31] = x[32] * 1e6
    scales[31] = 1e-6
    x[[40, 41, 301]] = x[40]  # duplicates, equal scales: exact ties
    scales[[40, 41, 301]] = scales[40]
    s = exact_scores(x, q, "cov") * scales[:, None].astype(np.float64)
    want = _scaled_topk(x, q, 60, scales, "numpy", 128)
    for rows in (128, 600, 77):
        got = _scaled_topk(x, q, 60, scales, backend, rows)
        for side in ("pos", "neg"):
            np.testing.assert_array_equal(got[side][0], want[side][0])
            np.testing.assert_allclose(got[side][1], want[side][1], rtol=1e-5, atol=1e-6)
        assert_valid_topk(got, s, 60, 1e-5 * float(np.abs(s).max()))
    full = _scaled_topk(x, q, len(x), scales, backend, 128)
    for side in ("pos", "neg"):
        idx, sc = full[side]
        assert np.all(sc[np.isin(idx, np.r_[0:600:50, 13])] == 0.0)
        for j in range(len(q)):  # the duplicates: listed in index order, equal scores
            where = [int(np.flatnonzero(idx[j] == r)[0]) for r in (40, 41, 301)]
            assert where == sorted(where) and len({float(sc[j, w]) for w in where}) == 1


def test_rows_beyond_the_row_scales_are_an_error(backend):
    _row_scale_backend(backend)
    x, q = _random(100, 2, 6)
    acc = make_accumulator(q, 3, "cov", ("pos",), backend)
    acc.set_row_scales(np.ones(50, np.float32))
    with pytest.raises(InvalidInputError, match="row scales cover rows 0..50"):
        acc.push_block(40, x[:20])
