"""The numpy reference backend: blocked, exact, ties to the lower row index.

Every other backend must return the same indices and scores (to float32 tolerance) as this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.errors import InvalidInputError, ScoreUnderflowError
from daunce_store.scoring._accumulator import Accumulator
from daunce_store.scoring._vocabulary import SIDES

__all__ = ["prepare_rows", "prepare_queries", "topk_numpy", "merge_topk", "NumpyTopK", "score_overflow_error", "check_scores",
           "ScoreUnderflowError", "query_spread", "underflowed", "check_underflow"]

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


def query_spread(queries: np.ndarray, queries_prepared: bool) -> np.ndarray:
    """How much each query's losses vary across the columns, (m,) float64: max |q − mean(q)| of raw
    queries (0 exactly for a constant one); for prepared cov queries (centered, 1/(K − 1) folded in) the
    same measured back, max |q|·(K − 1). O(m·K): nothing next to a scan."""
    q = np.asarray(queries, dtype=np.float64)
    if queries_prepared:
        return np.abs(q).max(axis=1, initial=0.0) * max(q.shape[1] - 1, 1)
    return np.abs(q - q.mean(axis=1, keepdims=True)).max(axis=1, initial=0.0)


def underflowed(top: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Queries (m,) bool whose largest |score| ``top`` (over every row ranked) is below float32's normal
    range although the query varies (``spread`` > 0): each of its scores is 0 or a subnormal, i.e. the
    products of its losses with the train rows' underflowed. A real covariance is many orders above it."""
    return (spread > 0) & ~(top >= _TINY)


def score_underflow_error(query: str, spread: float, measure: str = "cov") -> ScoreUnderflowError:
    """The error of every backend and path when :func:`underflowed` holds for ``query`` (named for messages)."""
    head = (f"the {measure} scores of {query} are all 0 or below float32's normal range (~1.2e-38), so a ranking "
            "of them would be row order or rounding noise, not an attribution: ")
    if measure != "cov":  # a preconditioned measure's prepared query is not on the losses' scale
        return ScoreUnderflowError(head + f"they underflow float32. Score with --measure {measure}-corr or corr "
                                   "(both standardize, so the losses' scale does not matter)")
    if spread * spread < _TINY:  # the query's own losses vary below ~1e-19: products at their scale underflow
        why = (f"its losses vary across the perturbations only at ~{spread:.0e}, and covariances of losses at "
               f"that scale (~{spread * spread:.0e}) underflow float32 (e.g. subnormal losses ~1e-40)")
    else:
        why = (f"its losses vary at ~{spread:.2g}, but the train losses vary across the perturbations only at "
               f"~{_TINY / spread:.0e} or less (or not at all), and their covariances with it underflow float32")
    return ScoreUnderflowError(
        head + why + ". Score with --measure corr (it standardizes each row's losses, so it works at any scale), "
        "or rescale the losses (multiply them by a constant) before appending"
    )


def check_underflow(result: dict[str, tuple[np.ndarray, np.ndarray]], queries: np.ndarray, queries_prepared: bool,
                    kernel: str, names: Sequence[str] | None = None, measure: str = "cov") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``result`` (a finished top-k: ``{side: (indices, scores)}``) unless a query's cov scores all
    underflowed (:func:`underflowed`), then :class:`ScoreUnderflowError` naming the first such query.

    Run on the final answer of every path (each backend, the fused store read, the distributed merge), so
    they all agree; it reads the (m, k) scores and the (m, K) queries only, so normal inputs cost nothing
    and come back untouched. A side's top-k holds its extreme score; with one side asked for, that side's
    extreme stands for all (a query with no score in float32's normal range on that side, yet varying, is
    all but always an underflowed one). corr scores are correlations in [−1, 1] and are not checked."""
    if kernel != "cov" or not result:
        return result
    top = np.zeros(np.shape(queries)[0])
    for _, scores in result.values():
        if scores.size:
            top = np.maximum(top, np.abs(scores.astype(np.float64)).max(axis=1))
    bad = np.flatnonzero(~(top >= _TINY))  # cheap first test: normal answers stop here
    if len(bad):
        spread = query_spread(queries, queries_prepared)
        bad = np.flatnonzero(underflowed(top, spread))
        if len(bad):
            j = int(bad[0])
            raise score_underflow_error(f"query {names[j]!r}" if names is not None else f"query {j}", float(spread[j]), measure)
    return result


def first_nan_query(scores: np.ndarray) -> int | None:
    """The first query (column of ``scores``, (R, m)) holding a NaN score, or None; one sum in the common
    case (a sum is NaN when a NaN is in it, or when infs of both signs meet: then the exact test decides)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isnan(scores.sum()):
            return None
    nan = np.isnan(scores).any(axis=0)
    return int(np.flatnonzero(nan)[0]) if nan.any() else None


def row_scales_of(scales: np.ndarray, offset: int, rows: int) -> np.ndarray:
    """The row scales of rows ``offset .. offset + rows``; rows beyond them are an error (as in the kernel)."""
    if offset + rows > len(scales):
        raise InvalidInputError(f"rows {offset}..{offset + rows} pushed, but the row scales cover rows 0..{len(scales)}")
    return scales[offset : offset + rows]


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


class NumpyTopK(Accumulator):
    """The reference as a streaming accumulator: ``push_block(offset, block)`` then ``finish()``.

    ``push_scores(offset, scores)`` folds precomputed scores of a single query (e.g. self-influence).
    """

    takes_row_scales = True

    def __init__(self, queries: np.ndarray, k: int, measure: str = "cov", sides: tuple[str, ...] = SIDES,
                 queries_prepared: bool = False):
        self.qp = np.ascontiguousarray(queries, np.float32) if queries_prepared else prepare_queries(queries, measure)
        self.k, self.measure, self.sides = k, measure, tuple(sides)
        empty = (np.empty(0, np.int64), np.empty(0, np.float32))
        self.best = {side: [empty] * self.qp.shape[0] for side in self.sides}
        self.rows_seen = 0
        self.row_scales: np.ndarray | None = None

    def set_row_scales(self, scales: np.ndarray) -> None:
        """Multiply every score of train row i pushed from now on by ``scales[i]`` (one float32 per train
        row): the normalised preconditioned measures with their persisted row scales (as the Rust kernel)."""
        self.row_scales = np.ascontiguousarray(scales, np.float32).reshape(-1)

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
            if self.row_scales is not None:
                scores *= row_scales_of(self.row_scales, offset, len(block))[:, None]
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
    sides: tuple[str, ...] = SIDES,
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
