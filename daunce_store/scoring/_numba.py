"""The numba backend: the fallback when the Rust extension is not built; same results as the reference.

Rows are prepared by a compiled loop (same arithmetic as :func:`daunce_store.scoring._numpy.prepare_rows`),
scores come from one BLAS matmul per tile of rows, and selection is compiled (releasing the GIL, so the
store's reader thread keeps prefetching): each query's scores are
compared with its running k-th score, and only the candidates that beat it go into a buffer, which is cut
back to k in linear time (a partition, ties to the lower row index) when it fills.
"""

from __future__ import annotations

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring._numpy import _TINY, check_scores, prepare_queries, row_scales_of, score_overflow_error
from daunce_store.scoring._accumulator import Accumulator
from daunce_store.scoring._vocabulary import SIDES

__all__ = ["NumbaTopK", "available"]

try:  # numba is an optional extra
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False


def available() -> bool:
    return HAVE_NUMBA


# Scores computed per GEMM tile: bounds the temporary (m × rows) score matrix whatever m is.
_TILE_VALUES = 1 << 22

if HAVE_NUMBA:

    @njit(parallel=True, cache=True, nogil=True)
    def _prepare_rows(x: np.ndarray, corr: bool) -> np.ndarray:  # pragma: no cover - compiled
        r, kc = x.shape
        out = np.empty((r, kc), np.float32)
        for i in prange(r):
            s = 0.0
            for t in range(kc):
                s += np.float64(x[i, t])
            mean = np.float32(s / kc)
            for t in range(kc):
                out[i, t] = x[i, t] - mean
            if corr:
                ss = 0.0
                for t in range(kc):
                    v = np.float64(out[i, t])
                    ss += v * v
                norm64 = np.sqrt(ss)
                if norm64 >= _TINY:
                    scale = np.float32(1.0) / np.float32(norm64)
                    for t in range(kc):
                        out[i, t] *= scale
                elif norm64 > 0:  # subnormal norm: its float32 reciprocal is inf (see _numpy.prepare_rows)
                    for t in range(kc):
                        out[i, t] = np.float32(np.float64(out[i, t]) / norm64)
                else:
                    for t in range(kc):
                        out[i, t] = np.float32(0.0)
        return out

    @njit(cache=True, nogil=True)
    def _cut(keys: np.ndarray, idxs: np.ndarray, c: int, k: int) -> tuple[float, int]:  # pragma: no cover
        """Keep the k best of keys[:c] (larger key, then lower index) in front; return the k-th."""
        vals = keys[:c]
        kth = -np.partition(-vals, k - 1)[k - 1]
        n_gt = 0
        for t in range(c):
            if vals[t] > kth:
                n_gt += 1
        eq = np.empty(c - n_gt, np.int64)
        ne = 0
        for t in range(c):
            if vals[t] == kth:
                eq[ne] = idxs[t]
                ne += 1
        eq = np.sort(eq[:ne])[: k - n_gt]
        w = 0
        for t in range(c):  # the strictly better ones keep their slots' relative order
            if vals[t] > kth:
                keys[w] = vals[t]
                idxs[w] = idxs[t]
                w += 1
        for t in range(eq.shape[0]):
            keys[w] = kth
            idxs[w] = eq[t]
            w += 1
        return kth, eq[-1]

    @njit(parallel=True, cache=True, nogil=True)
    def _select(scores, base, sign, k, keys, idxs, counts, thr_key, thr_idx, full, nan):  # pragma: no cover
        """Fold scores (m, R) of rows base .. base + R; key = sign * score, larger is better. A NaN score is
        noted in ``nan[j]`` (it has no place in the order), not ranked."""
        m, r = scores.shape
        cap = keys.shape[1]
        for j in prange(m):
            c = counts[j]
            tk = thr_key[j]
            ti = thr_idx[j]
            f = full[j]
            for t in range(r):
                x = sign * scores[j, t]
                if x != x:
                    nan[j] = True
                    continue
                if f:
                    if x < tk or (x == tk and base + t > ti):
                        continue
                keys[j, c] = x
                idxs[j, c] = base + t
                c += 1
                if c == cap:
                    tk, ti = _cut(keys[j], idxs[j], c, k)
                    c = k
                    f = True
            counts[j] = c
            thr_key[j] = tk
            thr_idx[j] = ti
            full[j] = f


class _SideState:
    def __init__(self, m: int, k: int):
        cap = k + min(max(k // 4, 64), 4096)
        self.keys = np.empty((m, cap), np.float32)
        self.idxs = np.empty((m, cap), np.int64)
        self.counts = np.zeros(m, np.int64)
        self.thr_key = np.full(m, -np.inf, np.float32)
        self.thr_idx = np.full(m, np.iinfo(np.int64).max, np.int64)
        self.full = np.zeros(m, np.bool_)
        self.nan = np.zeros(m, np.bool_)


class NumbaTopK(Accumulator):
    """Streaming accumulator with the same interface as the Rust ``TopKAccumulator``."""

    takes_row_scales = True

    def __init__(self, queries: np.ndarray, k: int, measure: str = "cov", sides: tuple[str, ...] = SIDES,
                 queries_prepared: bool = False):
        if not HAVE_NUMBA:
            raise InvalidInputError("the numba backend needs numba: pip install 'daunce-store[numba]'")
        q = np.ascontiguousarray(queries, np.float32)
        self.qp = q if queries_prepared else prepare_queries(q, measure)
        self.k, self.corr, self.sides = int(k), measure == "corr", tuple(sides)
        self.state = {s: _SideState(self.qp.shape[0], self.k) for s in self.sides}
        self.rows_seen = 0
        self.row_scales: np.ndarray | None = None

    def set_row_scales(self, scales: np.ndarray) -> None:
        """Multiply every score of train row i pushed from now on by ``scales[i]`` (as the Rust kernel)."""
        self.row_scales = np.ascontiguousarray(scales, np.float32).reshape(-1)

    def push_scores(self, offset: int, scores: np.ndarray) -> None:
        """Fold scores (R,) of rows ``offset .. offset + R`` for a single query, or (m, R) for m."""
        s = np.ascontiguousarray(scores, np.float32)
        s = s[None, :] if s.ndim == 1 else s
        self.rows_seen += s.shape[1]
        for side, st in self.state.items():
            sign = np.float32(1.0 if side == "pos" else -1.0)
            _select(s, np.int64(offset), sign, self.k, st.keys, st.idxs, st.counts, st.thr_key, st.thr_idx, st.full, st.nan)

    def push_block(self, offset: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.float32)
        if block.ndim != 2 or block.shape[1] != self.qp.shape[1]:
            raise InvalidInputError(
                f"block has shape {block.shape} but the queries have {self.qp.shape[1]} columns; "
                "score with the columns both have"
            )
        m = self.qp.shape[0]
        rows = max(256, _TILE_VALUES // max(m, 1))
        for r0 in range(0, block.shape[0], rows):
            prep = _prepare_rows(block[r0 : r0 + rows], self.corr)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by finish, by query
                scores = self.qp @ prep.T  # (m, rows), C-contiguous
                if self.row_scales is not None:
                    scores *= row_scales_of(self.row_scales, offset + r0, len(prep))[None, :]
            self.push_scores(offset + r0, scores)

    def finish(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.rows_seen < self.k:
            raise InvalidInputError(f"k={self.k} exceeds the number of rows {self.rows_seen}; use a smaller k")
        out = {}
        m, k = self.qp.shape[0], self.k
        for st in self.state.values():
            if st.nan.any():
                raise score_overflow_error(int(np.flatnonzero(st.nan)[0]))
        for side, st in self.state.items():
            keys = np.empty((m, k), np.float32)
            idxs = np.empty((m, k), np.int64)
            for j in range(m):
                c = int(st.counts[j])
                if c > k:
                    _cut(st.keys[j], st.idxs[j], c, k)
                keys[j], idxs[j] = st.keys[j, :k], st.idxs[j, :k]
            order = np.lexsort((idxs, -keys), axis=-1)
            idxs = np.take_along_axis(idxs, order, axis=-1)
            keys = np.take_along_axis(keys, order, axis=-1)
            out[side] = (idxs, keys if side == "pos" else -keys)
        return check_scores(out)
