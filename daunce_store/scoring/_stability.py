"""Convergence diagnostics: is K large enough for these top-k lists?

Two questions, answered from one streaming pass over the train losses:

* **Nested subsets** — would the first K/4, K/2, ... committed columns have given the same top-k? The
  overlap of each subset's top-k set with the full-K top-k set shows whether the lists have settled
  (DESIGN §1: accuracy grows with K and saturates near K ≈ 200).
* **Bootstrap** — resample the K columns with replacement B times: the spread of each listed score over
  the resamples is its standard error, and the mean overlap of the resampled top-k sets with the full one
  says how much of the list is noise.

Every block is read once and pushed to every subset's and every resample's accumulator, so I/O is paid
once. The standard errors need the K losses of the listed rows only; they are re-read afterwards from
the blocks that hold them (k·m rows, not n).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.scoring._attribution import RowIds, scoring_request
from daunce_store.scoring._backend import make_accumulator, push_checked
from daunce_store.scoring._drift import DriftAccumulator, l2_center_of
from daunce_store.scoring._measures import DEFAULT_MEASURE
from daunce_store.scoring._numpy import check_underflow

if TYPE_CHECKING:
    import pandas as pd

    from daunce_store.store import LossStore, Snapshot

__all__ = ["Stability", "stability"]


@dataclasses.dataclass(frozen=True)
class Stability:
    """Top-k stability per query and side.

    ``indices``/``scores``: the full-K top-k (m, k). ``overlap[side]``: (m, F), the fraction of the
    full-K top-k set also in the top-k of the first ``columns[f]`` columns. ``bootstrap_overlap[side]``:
    (m,), mean overlap of the resampled top-k sets with the full one. ``stderr[side]``: (m, k), the
    bootstrap standard error of each listed score.
    """

    queries: tuple[str, ...]
    train_ids: np.ndarray | RowIds  # RowIds: only the listed rows' ids
    measure: str
    k: int
    num_columns: int
    columns: tuple[int, ...]
    bootstrap: int
    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]
    overlap: dict[str, np.ndarray]
    bootstrap_overlap: dict[str, np.ndarray]
    # Nyström health: asymmetry of the centered W̄ᵀŪ (0 = the losses respond linearly to the weights;
    # lower went with better scores on the LDS testbeds) and the share of negative eigenvalues of its symmetric
    # part (what the Nyström floor raises; no measure choice follows from either: bench/RESULTS.md, "Objective
    # forms and the measure choice"). None for measures without weights.
    asymmetry: float | None = None
    # The share of the train loss change common to all columns (scoring/_drift.py; None: unknown, a column
    # records no loss change), and where the columns' objective centred its L2 term ("zero", "theta0",
    # "mixed"; None: unknown).
    drift_share: float | None = None
    l2_center: str | None = None
    negative_share: float | None = None

    def summary_records(self) -> list[dict[str, Any]]:
        """One dict per (query, side): overlaps per column count, bootstrap overlap, median relative SE."""
        out = []
        for j, q in enumerate(self.queries):
            for side in self.indices:
                rec: dict[str, Any] = {"query": q, "side": side}
                for f, c in enumerate(self.columns):
                    rec[f"overlap@K={c}"] = float(self.overlap[side][j, f])
                rec["bootstrap_overlap"] = float(self.bootstrap_overlap[side][j]) if self.bootstrap else float("nan")
                sc, se = self.scores[side][j], self.stderr[side][j]
                rel = np.divide(se, np.abs(sc), out=np.full_like(se, np.inf), where=sc != 0)
                rec["median_rel_stderr"] = float(np.median(rel)) if self.bootstrap else float("nan")
                out.append(rec)
        return out

    def records(self) -> list[dict[str, Any]]:
        """One dict per (query, side, rank): the listed row, its score and standard error, and the
        query's overlaps (repeated on each of its rows)."""
        summary = {(r["query"], r["side"]): r for r in self.summary_records()}
        out = []
        for j, q in enumerate(self.queries):
            for side in self.indices:
                extra = {key: v for key, v in summary[(q, side)].items() if key not in ("query", "side")}
                for rank in range(self.k):
                    i = int(self.indices[side][j, rank])
                    out.append({"query": q, "side": side, "rank": rank + 1, "train_id": str(self.train_ids[i]),
                                "train_index": i, "score": float(self.scores[side][j, rank]),
                                "stderr": float(self.stderr[side][j, rank]), **extra})
        return out

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame.from_records(self.records())

    def summary(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame.from_records(self.summary_records())


MAX_BOOTSTRAP = 10_000


def _column_counts(fractions: Sequence[float], num: int) -> tuple[int, ...]:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or \
            any(isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) for f in fractions):
        raise InvalidInputError(f"fractions must be a list of numbers in (0, 1], e.g. (0.25, 0.5, 1.0), not {fractions!r}")
    if not fractions:
        raise InvalidInputError("give at least one fraction of the columns, e.g. (0.25, 0.5, 1.0)")
    counts = []
    for f in fractions:
        if not 0 < f <= 1:
            raise InvalidInputError(f"fractions must be in (0, 1], not {f!r}")
        counts.append(min(num, max(2, math.ceil(f * num))))
    return tuple(sorted(set(counts) | {num}))


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, |set(a_j) ∩ set(b_j)| / k."""
    return np.array([len(np.intersect1d(x, y, assume_unique=True)) / len(y) for x, y in zip(a, b)])


def stability(
    store: LossStore,
    query_set: str,
    queries: Sequence[str] | None = None,
    *,
    k: int = 10,
    measure: str = DEFAULT_MEASURE,
    side: str = "both",
    fractions: Sequence[float] = (0.25, 0.5, 1.0),
    bootstrap: int = 20,
    seed: int = 0,
    backend: str = "auto",
    snapshot: Snapshot | None = None,
    block_rows: int | None = None,
) -> Stability:
    """Convergence diagnostics for the top-k of each query of ``query_set``.

    Over nested column subsets (the first ``f·K`` committed columns for each ``f`` in ``fractions``)
    and ``bootstrap`` resamples of the K columns (with replacement, seeded by ``seed``), report per query
    the overlap of each top-k set with the full-K top-k and each listed score's bootstrap standard error.
    Preconditioned measures (nystrom, whitened) get each subset's and resample's K × K matrix from one
    extra pass (see :mod:`daunce_store.scoring._measures`).

    >>> st = store.stability("test", k=10, bootstrap=20)          # doctest: +SKIP
    >>> st.summary()                                               # doctest: +SKIP
       query side  overlap@K=16  overlap@K=32  overlap@K=64  bootstrap_overlap  median_rel_stderr
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or not 0 <= bootstrap <= MAX_BOOTSTRAP:
        raise InvalidInputError(f"bootstrap must be a whole number in 0..{MAX_BOOTSTRAP} (each resample is one more scoring pass), not {bootstrap!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a whole number >= 0, not {seed!r}")
    req = scoring_request(store, query_set, queries, k, measure, side, snapshot, None, block_rows)
    signals = {} if req.gram is None else req.gram.diagnostics()  # nystrom's; none for whitened
    sides, num = req.sides, req.num_columns
    counts = _column_counts(fractions, num)
    rng = np.random.default_rng(seed)
    resamples = [np.sort(rng.integers(0, num, size=num)) for _ in range(bootstrap)]
    # A resample that drew one column only has no variance: draw again (vanishingly rare for K > 3).
    resamples = [r if len(np.unique(r)) > 1 else np.arange(num) for r in resamples]

    variants = [np.arange(c) for c in counts] + resamples
    preps = [req.prepared(v) for v in variants]
    accs = []
    for prep in preps:
        q, prepared = prep.kernel_queries
        accs.append(make_accumulator(q, k, prep.kernel, sides, backend, queries_prepared=prepared))
    whole = [np.array_equal(v, np.arange(num)) for v in variants]  # no column copy for these
    drift = DriftAccumulator.of(req.snapshot, req.slots, store.n_train)  # on the same pass
    for offset, block in req.blocks(store, block_rows):
        if drift is not None:
            drift.push(block)
        for v, full_width, prep, acc in zip(variants, whole, preps, accs):
            push_checked(acc, offset, prep.block(block if full_width else np.ascontiguousarray(block[:, v])))
    results = [acc.finish() for acc in accs]
    full = results[len(counts) - 1]
    # The answer is the full-K top-k: refused as topk refuses it when its cov scores all underflowed (a subset's
    # or resample's lists are only compared with it).
    check_underflow(full, *preps[len(counts) - 1].kernel_queries, preps[len(counts) - 1].kernel, req.names, req.measure.name)

    overlap = {s: np.stack([_overlap(r[s][0], full[s][0]) for r in results[: len(counts)]], axis=1) for s in sides}
    boot = results[len(counts):]
    boot_overlap = {s: (np.mean([_overlap(r[s][0], full[s][0]) for r in boot], axis=0) if boot else np.full(len(req.rows), np.nan)) for s in sides}

    stderr = {s: np.full(full[s][0].shape, np.nan, np.float32) for s in sides}
    if boot:
        listed = np.unique(np.concatenate([full[s][0].ravel() for s in sides]))
        losses = store.train_rows(listed, snapshot=req.snapshot, slots=req.slots)
        reps = [prep.dense(np.ascontiguousarray(losses[:, r])) for r, prep in zip(resamples, preps[len(counts):])]  # (L, m) each
        cols = np.arange(len(req.rows))[:, None]
        for s in sides:
            where = np.searchsorted(listed, full[s][0])  # (m, k) rows into `losses`
            picked = np.stack([d[where, cols] for d in reps])  # (B, m, k)
            # float64: scores near the loss bound (~1e30) have squares beyond float32
            stderr[s] = np.std(picked, axis=0, ddof=1, dtype=np.float64).astype(np.float32) if len(reps) > 1 else np.zeros_like(stderr[s])
    return Stability(
        queries=req.names, train_ids=RowIds.of(np.concatenate([full[s][0].ravel() for s in sides]), store.train_ids_at), measure=req.measure.name, k=int(k), num_columns=num, columns=counts,
        bootstrap=int(bootstrap), indices={s: full[s][0] for s in sides}, scores={s: full[s][1] for s in sides},
        stderr=stderr, overlap=overlap, bootstrap_overlap=boot_overlap,
        asymmetry=signals.get("asymmetry"), negative_share=signals.get("negative_share"),
        drift_share=None if drift is None else drift.share, l2_center=l2_center_of(req.snapshot, req.slots),
    )
