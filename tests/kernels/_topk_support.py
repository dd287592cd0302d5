"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import numpy as np


def blocks_of(x: np.ndarray, rows: int):
    """(offset, block) pairs like the store's iter_row_blocks."""
    for r0 in range(0, len(x), rows):
        yield r0, np.ascontiguousarray(x[r0 : r0 + rows])


def exact_scores(x: np.ndarray, q: np.ndarray, measure: str) -> np.ndarray:
    """(n, m) scores in float64 straight from the definition (DESIGN §1)."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=1, keepdims=True)
    qc = q.astype(np.float64) - q.astype(np.float64).mean(axis=1, keepdims=True)
    if measure == "corr":
        for a in (xc, qc):
            norm = np.linalg.norm(a, axis=1, keepdims=True)
            np.divide(a, norm, out=a, where=norm > 0)
            a[(norm == 0)[:, 0]] = 0.0
        return xc @ qc.T
    return xc @ qc.T / (x.shape[1] - 1)


def expected_topk(s: np.ndarray, k: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each column of exact scores, ties to the lower index."""
    key = -s if side == "pos" else s
    order = np.argsort(key, axis=0, kind="stable")[:k].T
    return order, np.take_along_axis(s.T, order, axis=1)


def assert_valid_topk(got: dict, s: np.ndarray, k: int, tol: float) -> None:
    """``got`` is a correct top-k of the exact scores ``s`` up to ``tol``: each listed score is the row's
    score, the list is ordered, and no row left out beats the last listed one by more than ``tol``."""
    for side, (idx, sc) in got.items():
        assert idx.shape == sc.shape == (s.shape[1], k) and idx.dtype == np.int64 and sc.dtype == np.float32
        for j in range(s.shape[1]):
            assert len(set(idx[j].tolist())) == k, f"{side} query {j}: repeated rows"
            true = s[idx[j], j]
            np.testing.assert_allclose(sc[j], true, rtol=1e-4, atol=tol)
            sign = 1.0 if side == "pos" else -1.0
            assert np.all(np.diff(sign * sc[j]) <= 0), f"{side} query {j}: not ordered"
            rest = np.ones(s.shape[0], bool)
            rest[idx[j]] = False
            if rest.any():
                assert sign * s[rest, j].max() <= sign * true[-1] + tol, f"{side} query {j}: a better row was left out"


def assert_same_topk(got: dict, want: dict, s: np.ndarray, tol: float) -> None:
    """Same scores (float32 tolerance) as the reference and same indices, except where two rows' exact
    scores are within ``tol`` of each other (then either order is right)."""
    assert set(got) == set(want)
    for side in want:
        gi, gs = got[side]
        wi, ws = want[side]
        np.testing.assert_allclose(gs, ws, rtol=1e-4, atol=tol)
        for j, t in zip(*np.nonzero(gi != wi)):
            a, b = s[gi[j, t], j], s[wi[j, t], j]
            assert abs(a - b) <= tol, f"{side} query {j} rank {t}: row {gi[j, t]} ({a}) vs reference row {wi[j, t]} ({b})"
