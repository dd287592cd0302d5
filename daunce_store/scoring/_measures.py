"""Score measures, in one place: what each one computes and how it becomes a call of the top-k kernel.

Every measure scores train example i against query j as ⟨a_i, b_j⟩, where the kernel prepares a_i from
i's K losses ("cov" rows: centered over K; "corr" rows: centered and unit-normed) and b_j is a prepared
query row (DESIGN §4). The measures differ only in a K × K matrix M applied to the queries (DESIGN §1.1):

* ``cov``  — M = I/(K − 1): the covariance of the losses, the paper's estimator. Targets g_iᵀH⁻¹FH⁻¹g_j.
* ``corr`` — cov normalised by both standard deviations (Pearson).
* ``nystrom`` — M = pinv(sym(W̄ᵀŪ)) with small eigenvalues raised to ``NYSTROM_FLOOR``·λ_max. The centered
  train columns are a sketch Ū = T W̄ of the influence kernel T = G H⁻¹ Gᵀ with the perturbations' own
  weights W (regenerated from each commit's recorded draw), so Ū M q̄_j is a Nyström estimate of T's
  column j: the influence function itself, not H⁻¹FH⁻¹. Needs every column's draw.
* ``whitened`` — M = (ŪᵀŪ + λI)⁻¹, λ = ``WHITEN_RIDGE``·tr(ŪᵀŪ)/K: needs no weights (black-box runs,
  imported columns).
* ``nystrom-corr``, ``whitened-corr`` — the same scores divided by √(train self-score) (and by the query's):
  the counterpart of corr, for retrieval (a backdoor's few strong proponents). The kernel gets rows
  transformed by M^½ and normalises them.

The K × K matrices come from one extra pass over the train losses (``Gram``), accumulated once per
column set, persisted in the store (``_daunce/matrices/``, FORMAT.md) and cached on the store handle, so
later processes read a few KB instead of every row; any column subset or bootstrap resample of those
columns gets its M from the same matrix without reading again (centering is a projection: P Eᵀ A E P).
What each matrix is, and how it becomes M, is its :class:`~daunce_store.scoring._preconditioners.Preconditioner`.

Adding a preconditioned measure: one :class:`~daunce_store.scoring._preconditioners.Preconditioner`
subclass (it registers itself and its two measures); the kernels only ever see "cov" or "corr".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.errors import DaunceStoreError, DivergedError, InvalidInputError
from daunce_store.scoring._numpy import prepare_queries, prepare_rows
from daunce_store.scoring._preconditioners import PRECONDITIONERS, Preconditioner, preconditioner_named
from daunce_store.store import PerturbationDraw, read_derived_matrix, read_row_scales, write_derived_matrix, write_row_scales

if TYPE_CHECKING:
    from daunce_store.store import LossStore, RowSource, Snapshot

__all__ = ["MEASURES", "MEASURE_NAMES", "DEFAULT_MEASURE", "TOPK_MEASURE", "AUTOS", "Measure", "Gram", "Prepared", "resolve_measure", "prepare", "metric_self_scores",
           "gram_part", "gram_parts", "gram_pass", "gram_for", "stored_gram", "persist_grams", "column_names"]

# A Gram block term whose entries are all below this is made of float32 products at or under float32's normal
# range (1.2e-38): losses that vary only by ~1e-19 or less (e.g. subnormal losses ~1e-40). Such a Gram has lost
# its digits, and its inverse scales queries beyond float32; a real Gram is many orders above it.
GRAM_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class Measure:
    """A score measure: the kernel's row preparation and the K × K preconditioner (None: plain cov/corr)."""

    name: str
    kernel: str  # "cov" or "corr": how the kernel prepares rows
    preconditioner: str | None  # None, or the name of a registered Preconditioner
    help: str

    @property
    def needs_draws(self) -> bool:
        return self.preconditioner is not None and preconditioner_named(self.preconditioner).needs_draws

    @property
    def normalized(self) -> bool:
        return self.kernel == "corr"


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        *(Measure(p.name, "cov", p.name, p.help) for p in PRECONDITIONERS.values()),
        Measure("cov", "cov", None, "plain covariance of the losses across perturbations (the paper's estimator)"),
        Measure("corr", "corr", None, "Pearson correlation across perturbations"),
        *(Measure(f"{p.name}-corr", "corr", p.name, p.corr_help) for p in PRECONDITIONERS.values()),
    )
}
AUTO = "auto"  # nystrom when every column records its draw, else whitened
AUTO_CORR = "auto-corr"  # the same choice, normalised: nystrom-corr, else whitened-corr
# The defaults per task, in one place (CLI, façade and server read them here):
# * DEFAULT_MEASURE, for curation (influence, select, scores, self-influence, stability, check-removal):
#   nystrom has the best worst-case LDS at every K (0.525 at K = 64 against 0.261 for nystrom-corr;
#   bench/RESULTS.md, "Accuracy").
# * TOPK_MEASURE, for lists read by people (topk, the serve page): unnormalised measures open unrelated
#   queries' lists with the same high-leverage rows: the 1 % highest self-influence rows held 21 % (digits),
#   5 % (chatterbot), 7.5 % (poisoned chatterbot) and 12.5 % (SmolLM2 dialogues) of all top-5 slots under
#   nystrom, 0.4-2.5 % under nystrom-corr (random: 1 %), which also retrieves backdoors best (P@5 0.98 and
#   1.00 against 0.45 and 0.72) (bench/RESULTS.md, "Default rankings").
DEFAULT_MEASURE = AUTO
TOPK_MEASURE = AUTO_CORR
AUTOS = {AUTO: ("nystrom", "whitened"), AUTO_CORR: ("nystrom-corr", "whitened-corr")}  # (with draws, without)
MEASURE_NAMES = (AUTO, AUTO_CORR, *MEASURES)
MEASURE_HELP = "; ".join(
    [f"{AUTO}: nystrom when every column records the draw of an IF/Fisher fine-tune (the runner's), else whitened",
     f"{AUTO_CORR}: nystrom-corr when it does, else whitened-corr"] + [f"{m.name}: {m.help}" for m in MEASURES.values()]
)


def draws_of(snapshot: Snapshot, slots: Sequence[int]) -> list[PerturbationDraw | None]:
    """The recorded draw of the column in each slot (None where its commit records none)."""
    by_slot = {c.slot: c for c in snapshot.commits}
    return [PerturbationDraw.from_metadata(by_slot[s].metadata) if s in by_slot else None for s in slots]


def recorded_draws(snapshot: Snapshot, slots: Sequence[int]) -> list[PerturbationDraw]:
    """The draws of a nystrom Gram's columns: :func:`resolve_measure` picks nystrom only where every column
    records one, so a missing draw here is a bug, not bad input."""
    draws = draws_of(snapshot, slots)
    present = [d for d in draws if d is not None]
    if len(present) != len(draws):
        raise AssertionError(f"{len(draws) - len(present)} of {len(draws)} columns record no draw; resolve_measure should have refused nystrom")
    return present


def resolve_measure(name: str, snapshot: Snapshot | None = None, slots: Sequence[int] = ()) -> Measure:
    """The :class:`Measure` called ``name``; ``auto`` (``auto-corr``) becomes nystrom (nystrom-corr) when every column in ``slots``
    records the draw of an IF- or Fisher-form fine-tune (the setting the LDS measurements cover), else
    whitened (whitened-corr). Nyström on columns without draws is a clear error; on black-box draws (w = −1[i∈D_k]/|D_k|,
    unmeasured on LDS) it is allowed when asked for by name."""
    if name not in AUTOS and name not in MEASURES:
        raise InvalidInputError(f"measure must be one of {', '.join(MEASURE_NAMES)}, not {name!r}")
    if snapshot is None or (name not in AUTOS and not MEASURES[name].needs_draws):
        return MEASURES[AUTOS[name][0] if name in AUTOS else name]
    draws = draws_of(snapshot, slots)
    missing = sum(d is None for d in draws)
    if name in AUTOS:
        measured = not missing and all(d is not None and d.objective != "blackbox" for d in draws)
        return MEASURES[AUTOS[name][0 if measured else 1]]
    if missing:
        raise InvalidInputError(
            f"measure {name!r} needs each perturbation's random weights, but {missing} of {len(slots)} columns "
            "record no draw (appended without metadata['draw'], e.g. black-box or imported columns); use "
            "--measure whitened, or append with metadata={'draw': PerturbationDraw(...).to_metadata()}"
        )
    return MEASURES[name]


def _center(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=1, keepdims=True)


# How a Gram's losses vary across the columns (Gram.spread): as float32 can square them, not at all, or only
# below float32's range (GRAM_TINY).
SPREAD_OK, SPREAD_CONSTANT, SPREAD_TINY = "ok", "constant", "tiny"
SPREADS = (SPREAD_OK, SPREAD_CONSTANT, SPREAD_TINY)


def gram_part(kind: str, block: np.ndarray, offset: int, draws: Sequence[PerturbationDraw] = (),
              names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, str]:
    """One row block's term of :class:`Gram`: ``(part (K, K) float64, per-column counts (K,) or empty,
    spread)``, with ``spread`` one of ``SPREAD_*`` for this block alone; the part is the ``kind``
    preconditioner's :meth:`~Preconditioner.block_part`. ``names``: the columns' perturbation ids, for the
    error a block raises when it holds losses beyond ±``MAX_ABS_LOSS`` (stored before appends refused them,
    or written by other means): a :class:`DivergedError` naming those columns. Without it such a column
    overflows the float32 Gram (read as "every loss is constant") or, below overflow, dominates every score."""
    pre = preconditioner_named(kind)
    # Two passes without a temporary, cheap beside the (K, R) x (R, K) GEMM below; NaN fails the test too.
    if not (block.max(initial=-np.inf) <= MAX_ABS_LOSS and block.min(initial=np.inf) >= -MAX_ABS_LOSS):
        raise _beyond_range(kind, block, offset, names)
    # float32 GEMMs summed in float64 across blocks: a preconditioner needs ~4 digits, not 16.
    u = prepare_rows(block, "cov")  # centered over K
    part, members = pre.block_part(u, offset, draws)
    if not np.isfinite(part).all():  # not for |loss| <= MAX_ABS_LOSS (its note bounds R); kept as the last word
        raise _beyond_range(kind, block, offset, names)
    if np.abs(part).max(initial=0.0) > GRAM_TINY:
        return part, members, SPREAD_OK
    return part, members, SPREAD_TINY if u.any() else SPREAD_CONSTANT


def _beyond_range(kind: str, block: np.ndarray, offset: int, names: Sequence[str]) -> DivergedError:
    """The error of a block holding losses beyond ±MAX_ABS_LOSS, naming their columns."""
    with np.errstate(invalid="ignore"):
        size = np.abs(block).max(axis=0)
    bad = np.flatnonzero(~(size <= MAX_ABS_LOSS))
    if not len(bad):  # only an overflowing part, which MAX_ABS_LOSS's bound on R rules out: name the largest column
        bad = np.array([int(np.argmax(size))])
    cols = [repr(names[j]) if j < len(names) else f"at position {j}" for j in bad[:5].tolist()]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return DivergedError(
        f"the {kind} measure cannot score train rows {offset}:{offset + len(block)}: the columns of perturbations "
        f"{', '.join(cols)}{more} hold losses up to |loss| {float(np.max(size[bad])):.3g}, beyond the ±{MAX_ABS_LOSS:g} "
        "that float32 scoring supports (their fine-tune diverged; they were stored before appends refused such "
        "losses, or written by other means). Leave those columns out (columns=), or rerun those perturbations "
        "with a lower learning rate into a new store"
    )


@dataclasses.dataclass(frozen=True)
class Gram:
    """The ``kind`` preconditioner's K × K matrix over every train row, float64, for the columns it was
    accumulated on: Σ_i x_i ū_iᵀ, ū_i row i's losses centered over the K columns (see
    :mod:`~daunce_store.scoring._preconditioners` for each kind's x_i). ``spread``: whether the losses vary
    across the columns at all (``SPREAD_CONSTANT`` if not), and whether float32 could square them
    (``SPREAD_TINY``: they vary only below ~1e-19, e.g. subnormal losses), so that an empty Gram is
    explained truthfully.
    """

    kind: str
    matrix: np.ndarray
    spread: str = SPREAD_OK

    @property
    def kind_class(self) -> Preconditioner:
        return preconditioner_named(self.kind)

    @classmethod
    def accumulate(cls, kind: str, blocks: Iterator[tuple[int, np.ndarray]], draws: Sequence[PerturbationDraw] = (),
                   names: Sequence[str] = ()) -> Gram:
        """One pass over ``blocks``; ``names``: the columns' perturbation ids (for errors)."""
        # One BLAS thread: these (K, R) x (R, K) products are small, the store's reader thread needs the
        # other core, and OpenBLAS's spinning threads made them 3-8x slower on a busy 2-core machine.
        with threadpool_limits(1, user_api="blas"):
            return cls.from_parts(kind, (gram_part(kind, block, offset, draws, names) for offset, block in blocks), len(draws))

    @classmethod
    def from_parts(cls, kind: str, parts: Iterable[tuple[np.ndarray, np.ndarray, str]], num_draws: int = 0) -> Gram:
        """The sum of :func:`gram_part` terms, in their order (float sums are not associative)."""
        pre = preconditioner_named(kind)
        matrix: np.ndarray | None = None
        counts = np.zeros(num_draws)
        spreads = set()
        for part, members, spread in parts:
            if len(members):
                counts += members
            spreads.add(spread)
            matrix = part if matrix is None else matrix + part
        if matrix is None:
            raise InvalidInputError("the store has no train rows to score")
        spread = next((s for s in (SPREAD_OK, SPREAD_TINY) if s in spreads), SPREAD_CONSTANT)
        return cls(kind, pre.finish(matrix, counts), spread)

    def selected(self, positions: np.ndarray | None) -> np.ndarray:
        """P Eᵀ A E P: the centered Gram of a column selection (positions may repeat: a bootstrap)."""
        a = self.matrix if positions is None else self.matrix[np.ix_(positions, positions)]
        p = np.eye(len(a)) - 1.0 / len(a)
        return p @ a @ p

    def diagnostics(self, positions: np.ndarray | None = None) -> dict[str, float]:
        """The preconditioner's health numbers on a column selection (e.g. nystrom's ``asymmetry``)."""
        return self.kind_class.diagnostics(self.selected(positions))

    def preconditioner(self, positions: np.ndarray | None = None) -> np.ndarray:
        """M, projected onto the centered subspace (P M P), (K', K') float64."""
        if self.spread == SPREAD_TINY:
            raise InvalidInputError(
                f"the train losses vary across the perturbations only by ~1e-19 or less (e.g. subnormal losses "
                f"~1e-40): float32 cannot square them, so the {self.kind} measure has nothing to invert. Score with "
                "--measure corr (it standardizes each row's losses, so it works at any scale), or rescale the losses "
                "(multiply them by a constant) before appending"
            )
        b = self.selected(positions)
        p = np.eye(len(b)) - 1.0 / len(b)
        return p @ self.kind_class.matrix(b, self.spread == SPREAD_CONSTANT) @ p


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One scoring request, ready for the kernel: ``queries`` (m, K) float32 prepared rows, the kernel's
    row preparation, and an optional (K, K) ``transform`` of each centered block (normalised measures), or
    instead (:meth:`scaled`) the persisted ``row_scales`` that multiply each train row's cov score.

    ``raw`` (plain cov/corr) hands the kernel the raw query losses, exactly as before measures existed.
    """

    measure: Measure
    kernel: str
    queries: np.ndarray
    raw_queries: np.ndarray | None
    transform: np.ndarray | None
    row_scales: np.ndarray | None = None

    def scaled(self, row_scales: np.ndarray) -> Prepared:
        """This normalised measure scored with its persisted row scales s_i = 1/‖ū_i M^½‖ (:func:`row_scales`):
        ⟨ū_i M^½ s_i, q̂_j⟩ = s_i·⟨ū_i, M^½ q̂_j⟩, so the kernel scores plain centered rows (cov) against the
        queries times M^½ and multiplies each row's scores by s_i, with no K × K product per row."""
        assert self.transform is not None and self.kernel == "corr"
        queries = np.ascontiguousarray((self.queries.astype(np.float64) @ self.transform.T.astype(np.float64)).astype(np.float32))
        return dataclasses.replace(self, kernel="cov", queries=queries, transform=None, row_scales=row_scales)

    @property
    def kernel_queries(self) -> tuple[np.ndarray, bool]:
        """(queries, queries_prepared) for :func:`make_accumulator`."""
        return (self.raw_queries, False) if self.raw_queries is not None else (self.queries, True)

    def block(self, block: np.ndarray) -> np.ndarray:
        """A store block as the kernel must see it."""
        if self.transform is None:
            return block
        with threadpool_limits(1, user_api="blas"):  # as in Gram.accumulate
            return np.ascontiguousarray(prepare_rows(block, "cov") @ self.transform)

    def dense(self, block: np.ndarray) -> np.ndarray:
        """(R, m) scores of a block's rows (the numpy reference of what the kernel ranks)."""
        return prepare_rows(self.block(block), self.kernel) @ self.queries.T


def row_scales(blocks: Iterable[tuple[int, np.ndarray]], n: int, root: np.ndarray) -> np.ndarray | None:
    """(n,) float32: each train row's 1/‖ū_i M^½‖ (0 for a row with no spread under M), computed as the
    kernel prepares a transformed corr row (centered, times ``root``, centered again, norm summed in float64);
    None when some row's scale is beyond float32 (a norm below ~3e-39) or not finite (a NaN row), where only
    the in-pass transform gives the right answer (or error)."""
    out = np.empty(n, np.float32)
    with threadpool_limits(1, user_api="blas"), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for offset, block in blocks:
            t = prepare_rows(prepare_rows(block, "cov") @ root, "cov")
            norm = np.sqrt(np.einsum("ij,ij->i", t, t, dtype=np.float64))
            out[offset : offset + len(block)] = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0)
    return out if np.isfinite(out).all() else None


def stored_row_scales(store: LossStore, snapshot: Snapshot, slots: Sequence[int], gram: Gram, block_rows: int | None = None,
                      *, compute: bool = True) -> np.ndarray | None:
    """The row scales (:func:`row_scales`) of ``gram``'s normalised measure over every column in ``slots``:
    the handle's cache, the store's persisted ones, or (writable handles only, and where ``compute``) one
    pass, then persisted create-if-absent beside the matrix (``_daunce/row-scales/``, FORMAT.md). None on a
    read-only handle of a store without them (the kernel then transforms each row in the pass) or where they
    cannot serve."""
    key = ("row-scales", gram.kind, tuple(int(s) for s in slots))
    cache = store.derived_cache
    if key in cache:
        return cache[key]
    found = read_row_scales(store, gram.kind, snapshot, slots)
    if found is None and (store.mode == "r" or not compute):
        if store.mode == "r":
            cache[key] = None  # a read-only handle never writes them: no need to look again
        return None
    if found is None:
        root = root_of(gram.preconditioner())
        found = row_scales(store.rows(snapshot, slots).blocks(block_rows), int(store.n_train), root.astype(np.float32))
        if found is not None:
            write_row_scales(store, gram.kind, snapshot, slots, found)
    cache[key] = found
    return found


def root_of(m: np.ndarray) -> np.ndarray:
    """M^½ of a symmetric M (float64; range ⊥ 1 when M's is)."""
    vals, vecs = np.linalg.eigh(m)
    return (vecs * np.sqrt(np.maximum(vals, 0.0))) @ vecs.T


def metric_self_scores(block: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """ū_iᵀ M ū_i per row of a block, (R,) float32: the self-influence of a preconditioned measure."""
    u = _center(block)
    return np.einsum("ij,ij->i", u @ metric, u).astype(np.float32)


def prepare(measure: Measure, q: np.ndarray, gram: Gram | None, positions: np.ndarray | None = None) -> Prepared:
    """Prepare queries ``q`` (m, K') — already restricted to ``positions`` of the Gram's columns."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    if measure.preconditioner is None:
        return Prepared(measure, measure.kernel, prepare_queries(q, measure.kernel), q, None)
    assert gram is not None and gram.kind == measure.preconditioner
    m = gram.preconditioner(positions)
    qc = _center(q)
    if not measure.normalized:
        return Prepared(measure, "cov", np.ascontiguousarray(_float32(qc @ m, measure)), None, None)
    root = root_of(m)  # M^½ (symmetric, range ⊥ 1)
    queries = prepare_rows(_float32(qc @ root, measure), "corr")
    return Prepared(measure, "corr", queries, None, _float32(root, measure))


def _float32(x: np.ndarray, measure: Measure) -> np.ndarray:
    """``x`` in float32, or a clear error where it does not fit: M scales like 1/spread², so losses that
    barely vary (~1e-19 and less) give prepared queries beyond float32, which would score as inf."""
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidInputError(
            f"the {measure.name} preconditioner scales the queries beyond float32: the train losses vary across the "
            "perturbations by too little for float32 (spreads of ~1e-19 or less, e.g. subnormal losses). Score with "
            "--measure corr (it standardizes each row's losses, so it works at any scale), or rescale the losses "
            "(multiply them by a constant) before appending"
        )
    return out


def _draws_and_names(rows: RowSource, kind: str) -> tuple[list[PerturbationDraw], list[str]]:
    """What a Gram pass of ``kind`` over ``rows`` needs besides the rows: the columns' draws (where the kind
    needs them) and perturbation ids (for errors)."""
    draws = recorded_draws(rows.snapshot, rows.slots) if preconditioner_named(kind).needs_draws else []
    return draws, column_names(rows.snapshot, rows.slots)


def gram_pass(rows: RowSource, kind: str, block_rows: int | None = None) -> Gram:
    """The Gram of ``kind`` over ``rows``: one streaming pass (:meth:`Gram.accumulate`), ``block_rows`` high
    (default the chunk rows)."""
    return Gram.accumulate(kind, rows.blocks(block_rows), *_draws_and_names(rows, kind))


def gram_parts(rows: RowSource, kind: str, block_rows: int, row_range: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """:func:`gram_part` of each block of rows ``row_range``, unsummed and in row order (one partition of a
    distributed pass: the driver sums them with :meth:`Gram.from_parts`, as :func:`gram_pass` would)."""
    draws, names = _draws_and_names(rows, kind)
    with threadpool_limits(1, user_api="blas"):  # as in Gram.accumulate: the same GEMM path, the same bits
        return [gram_part(kind, block, offset, draws, names) for offset, block in rows.blocks(block_rows, row_range)]


def gram_for(store: LossStore, snapshot: Snapshot, slots: Sequence[int], kind: str, block_rows: int | None = None) -> Gram:
    """The Gram of ``kind`` over the columns in ``slots``: the store handle's, the store's persisted one, or
    one streaming pass over ``store.rows`` (then persisted; see :func:`stored_gram`)."""
    return stored_gram(store, snapshot, slots, kind, lambda: gram_pass(store.rows(snapshot, slots), kind, block_rows))


def stored_gram(store: LossStore, snapshot: Snapshot, slots: Sequence[int], kind: str, compute: Callable[[], Gram]) -> Gram:
    """The Gram of ``kind`` over ``slots`` from, in order: the handle's cache; the matrix persisted in the
    store for exactly these columns (``store.read_derived_matrix``: any process wrote it, this one or
    another, a Dask driver included); else ``compute()``, which is then persisted (create-if-absent, by a
    writable handle only) and cached. Committed columns never change, so none of these goes stale."""
    key = ("gram", kind, tuple(int(s) for s in slots))
    cache = store.derived_cache
    if key not in cache:
        found = read_derived_matrix(store, kind, snapshot, slots)
        if found is not None and found[1].get("spread") in SPREADS:
            cache[key] = Gram(kind, found[0], found[1]["spread"])
        else:
            gram = compute()
            write_derived_matrix(store, kind, snapshot, slots, gram.matrix, {"spread": gram.spread})
            cache[key] = gram
    return cache[key]


def persist_grams(store: LossStore, measure: str = AUTO) -> list[tuple[str, int]]:
    """Make sure the store holds ``measure``'s K × K matrix (default: the default measures' kind) for every
    column set scoring asks for: all committed columns (self-influence, select) and each query set's. A
    pass for each one missing, persisted by this (writable) handle; returns (kind, K) of each set covered.
    For ``daunce compact``: scoring commands open stores read-only and never write one themselves."""
    snap = store.snapshot()
    sets = {tuple(store.committed_slots(snapshot=snap))}
    sets |= {tuple(store.committed_slots(snapshot=snap, query_set=q)) for q in store.query_sets()}
    done = []
    for slots in sorted(s for s in sets if len(s) >= 2):
        resolved = resolve_measure(measure, snap, slots)
        if resolved.preconditioner is not None:
            gram = gram_for(store, snap, list(slots), resolved.preconditioner)
            try:  # the -corr measures' (auto-corr is topk's default)
                stored_row_scales(store, snap, list(slots), gram)
            except DaunceStoreError:  # losses M cannot be made of (scoring says so itself); the matrix stays
                pass
            done.append((resolved.preconditioner, len(slots)))
    return done


def column_names(snapshot: Snapshot, slots: Sequence[int]) -> list[str]:
    """The perturbation id of the column in each slot (for messages)."""
    by_slot = {c.slot: c.perturbation for c in snapshot.commits}
    return [by_slot.get(s, f"slot {s}") for s in slots]
