"""The numpy reference backend: blocked, exact, ties to the lower row index.

Every other backend must return the same indices and scores (to float32 tolerance) as this one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.errors import InvalidInputError

__all__ = ["prepare_rows", "prepare_queries", "topk_numpy", "merge_topk", "NumpyTopK", "score_overflow_error", "check_scores"]

# float32's smallest normal number: a row norm below it has a reciprocal beyond float32 (see prepare_rows).
_TINY = float(np.finfo(np.float32).tiny)


def score_overflow_error(query: int) -> InvalidInputError:
    """The error of every backend when a score is inf or NaN (the Rust kernel's ``ScoreOverflow`` says the
    same): finite losses that large have no float32 score, and NaN has no place in a ranking or in JSON."""
    bound = f"{MAX_ABS_LOSS:g}".replace("e+", "e")
    return InvalidInputError(
        f"scores of query {query} overflow float32 (inf or NaN): the losses are too large to score; a store "
        f"refuses |loss| > {bound} (MAX_ABS_LOSS), so such a column came from a diverged fine-tune appended before "
        "that check or written by other means: leave its columns out (columns=) or rescale the losses"
    )


def check_scores(result: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``result`` when every score in it is finite, else :func:`score_overflow_error` for the first query
    with an inf (an inf score always makes its side's top-k)."""
    for _, scores in result.values():
        bad = ~np.isfinite(scores)
        if bad.any():
            raise score_overflow_error(int(np.flatnonzero(bad.any(axis=1))[0]))
    return result


def first_nan_query(scores: np.ndarray) -> int | None:
    """The first query (column of ``scores``, (R, m)) holding a NaN score, or None; one sum in the common
    case (a sum is NaN when a NaN is in it, or when infs of both signs meet: then the exact test decides)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isnan(scores.sum()):
            return None
    nan = np.isnan(scores).any(axis=0)
    return int(np.flatnonzero(nan)[0]) if nan.any() else None


def prepare_rows(x: np.ndarray, measure: str) -> np.ndarray:
    """Center each row over the K columns; for ``corr`` also scale it to unit norm.

    Then cov(i, j) = <a_i, b_j> / (K - 1) and corr(i, j) = <a_i, b_j> (DESIGN §1). A constant row has
    zero norm; its correlation with anything is defined as 0. A row whose norm is below float32's smallest
    normal (it varies only in subnormals, e.g. losses ~1e-40) is divided by its norm in float64: the float32
    reciprocal would be inf (and inf × 0 NaN). Every backend does the same.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=1, dtype=np.float64, keepdims=True).astype(np.float32)
    xc = x - mean
    if measure == "corr":
        norm64 = np.sqrt(np.einsum("ij,ij->i", xc, xc, dtype=np.float64))
        norm = norm64.astype(np.float32)
        normal = norm64 >= _TINY
        scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=normal)
        xc *= scale[:, None]
        tiny = np.flatnonzero(~normal & (norm64 > 0))
        if len(tiny):  # rare: zeroed by the scale above, refilled here
            xc[tiny] = ((x[tiny] - mean[tiny]).astype(np.float64) / norm64[tiny, None]).astype(np.float32)
    return np.ascontiguousarray(xc, dtype=np.float32)


def prepare_queries(q: np.ndarray, measure: str) -> np.ndarray:
    """Queries prepared like rows; for ``cov`` the 1/(K - 1) is folded in here, once."""
    qc = prepare_rows(q, measure)
    if measure == "cov":
        qc /= np.float32(max(q.shape[1] - 1, 1))
    return qc


def merge_topk(
    best_idx: np.ndarray, best_val: np.ndarray, idx: np.ndarray, val: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest of (best ∪ new) by (value desc, index asc)."""
    all_idx = np.concatenate([best_idx, idx])
    all_val = np.concatenate([best_val, val])
    order = np.lexsort((all_idx, -all_val))[:k]
    return all_idx[order], all_val[order]


def _select_block(scores: np.ndarray, offset: int, k: int, best: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Fold one block's scores (R, m) into each query's running top-k (largest first)."""
    r = scores.shape[0]
    kk = min(k, r)
    # The block's own k-th largest per query; only entries >= max(that, running k-th) can enter.
    block_kth = np.partition(scores, r - kk, axis=0)[r - kk]
    for j, (bi, bv) in enumerate(best):
        thr = block_kth[j]
        if len(bv) == k:
            thr = max(thr, bv[-1])
        cand = np.flatnonzero(scores[:, j] >= thr)
        best[j] = merge_topk(bi, bv, cand + offset, scores[cand, j], k)


class NumpyTopK:
    """The reference as a streaming accumulator: ``push_block(offset, block)`` then ``finish()``.

    ``push_scores(offset, scores)`` folds precomputed scores of a single query (e.g. self-influence).
    """

    def __init__(self, queries: np.ndarray, k: int, measure: str = "cov", sides: tuple[str, ...] = ("pos", "neg"),
                 queries_prepared: bool = False):
        self.qp = np.ascontiguousarray(queries, np.float32) if queries_prepared else prepare_queries(queries, measure)
        self.k, self.measure, self.sides = k, measure, tuple(sides)
        empty = (np.empty(0, np.int64), np.empty(0, np.float32))
        self.best = {side: [empty] * self.qp.shape[0] for side in self.sides}
        self.rows_seen = 0

    def push_scores(self, offset: int, scores: np.ndarray) -> None:
        """Fold scores (R,) or (R, m) of rows ``offset .. offset + R``."""
        scores = scores[:, None] if scores.ndim == 1 else scores
        if scores.shape[0] == 0:
            return
        nan = first_nan_query(scores)
        if nan is not None:
            raise score_overflow_error(nan)
        self.rows_seen += scores.shape[0]
        if "pos" in self.sides:
            _select_block(scores, offset, self.k, self.best["pos"])
        if "neg" in self.sides:
            _select_block(-scores, offset, self.k, self.best["neg"])

    def push_block(self, offset: int, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.qp.shape[1]:
            raise InvalidInputError(
                f"block has shape {block.shape} but the queries have {self.qp.shape[1]} columns; "
                "score with the columns both have"
            )
        # (R, m); never more than one block at a time. An overflow is reported by push_scores, by query.
        with np.errstate(over="ignore", invalid="ignore"):
            scores = prepare_rows(block, self.measure) @ self.qp.T
        self.push_scores(offset, scores)

    def finish(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.rows_seen < self.k:
            raise InvalidInputError(f"k={self.k} exceeds the number of rows {self.rows_seen}; use a smaller k")
        out = {}
        for side in self.sides:
            idx = np.stack([b[0] for b in self.best[side]]).astype(np.int64)
            val = np.stack([b[1] for b in self.best[side]]).astype(np.float32)
            out[side] = (idx, val if side == "pos" else -val)
        return check_scores(out)


def topk_numpy(
    blocks: Iterable[tuple[int, np.ndarray]],
    queries: np.ndarray,
    k: int,
    measure: str = "cov",
    sides: tuple[str, ...] = ("pos", "neg"),
    queries_prepared: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Top-k train rows per query for each side: ``{side: (indices (m, k) int64, scores (m, k) f32)}``.

    ``pos`` = largest scores (proponents), ``neg`` = smallest (opponents); ties go to the lower index.
    With ``queries_prepared`` the queries are used as given (already through ``prepare_queries``, or a
    mean of such rows for aggregate influence).
    """
    acc = NumpyTopK(queries, k, measure, sides, queries_prepared)
    for offset, block in blocks:
        acc.push_block(offset, block)
    return acc.finish()
