"""The torch backend (``backend="torch"``): GPU scoring, and train rows kept resident on the device.

Same contract as the other backends (DESIGN §4): rows are centered (corr: also unit-normed) over K with the
arithmetic of :func:`daunce_store.scoring._numpy.prepare_rows` (means and norms accumulated in float64),
scored by one matmul per tile of rows, prepared queries (m, K) @ rows (K, R), fp32 (TF32 only when asked),
and selected without sorting the tile:

1. **Threshold.** Each query keeps its running top-k as keys (score for ``pos``, −score for ``neg``) and
   rows, ordered by (key desc, row asc); its k-th key is the threshold. One comparison marks the tile's
   scores that reach it and one reduction counts them per query (the one host sync of a tile).
2. **Cut, only when needed.** When some query has more than ``cap`` candidates (the first tiles, or rows
   arriving in rising order), the threshold is first raised to the tile's own k-th best key from
   ``torch.topk``. Only that *value* is used: topk's order among equal values is unspecified, and the
   mask keeps every row tied with it.
3. **Compact and merge.** ``nonzero`` lists the candidates row-major (so rows ascend within a query); they
   go into an (m, c_max) buffer padded with (−inf, no row) and are merged with the running (m, k) list by
   the total order (key desc, row asc): a sort by row, then a stable sort by key, cut to k. Equal scores
   therefore keep the lower row index whatever order the blocks come in, as on every other backend.

On CUDA, host blocks are copied into one of two pinned buffers and sent to the device on a side stream;
:meth:`TorchTopK.push_block` launches the previous block's first matmul *before* it stages the new block,
so the host copy and the transfer overlap that compute. :class:`TorchScorer` keeps the prepared train
matrix on the device and answers any number of query batches with the same selection; :func:`~daunce_store.scoring._scorer.scorer`
builds one from a store (``Store.scorer``).

torch is optional: this module imports without it, :func:`available` says whether it imports, and using
the backend without it raises :class:`~daunce_store.errors.MissingDependencyError` naming the extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from daunce_store._optional import import_optional
from daunce_store.errors import InvalidInputError
from daunce_store.scoring._numpy import _TINY, check_scores, check_underflow, prepare_queries, score_overflow_error
from daunce_store.scoring._accumulator import Accumulator
from daunce_store.scoring._vocabulary import KERNEL_MEASURES, SIDES

__all__ = ["TORCH_EXTRA", "TorchTopK", "TorchScorer", "available", "default_device"]

TORCH_EXTRA = "torch"  # pip install 'daunce-store[torch]'
_NO_ROW = int(np.iinfo(np.int64).max)  # the row of an unfilled slot: sorts after every real row
# Scores per tile (m queries × rows): bounds the temporaries (scores, masks) whatever m is. On a GPU a
# 2^28-value tile is 1 GiB of fp32 scores, enough for one store block (65536 rows) × 1000 queries in one
# matmul; on a CPU 2^22 keeps the tile in cache-friendly reach, as in the numba backend.
_TILE_VALUES = {"cuda": 1 << 28, "cpu": 1 << 22}


@functools.cache
def available() -> bool:
    """Whether torch imports here (the backend then runs on CPU at least)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch() -> Any:
    return import_optional("torch", TORCH_EXTRA, "the torch scoring backend")


def default_device() -> str:
    """``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``."""
    return "cuda" if _torch().cuda.is_available() else "cpu"


def _device(torch: Any, device: Any) -> Any:
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"device {str(dev)!r} was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use device='cpu' or install a CUDA build of torch"
        )
    return dev


@contextlib.contextmanager
def _matmul_precision(torch: Any, allow_tf32: bool) -> Iterator[None]:
    """fp32 matmuls exactly (IEEE) unless ``allow_tf32``; the process-wide cuBLAS setting is restored after.

    torch >= 2.9 has ``fp32_precision`` and refuses a mix of it and the legacy ``allow_tf32`` flag, so the
    new one is used where it exists (saving and restoring it is safe whichever API the caller used)."""
    mm = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32" if allow_tf32 else "ieee") if hasattr(mm, "fp32_precision") else ("allow_tf32", allow_tf32)
    old = getattr(mm, name)
    setattr(mm, name, value)
    try:
        yield
    finally:
        setattr(mm, name, old)


def _from_numpy(torch: Any, a: np.ndarray) -> Any:
    """A tensor over ``a``'s memory (no copy); store blocks may be read-only, which torch only warns about
    (nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _prepare_rows(torch: Any, x: Any, corr: bool) -> Any:
    """:func:`daunce_store.scoring._numpy.prepare_rows` on the device, same arithmetic: mean and norm in
    float64, cast to float32; a constant row's scale is 0 (its correlation with anything is 0)."""
    mean = x.mean(dim=1, keepdim=True, dtype=torch.float64).to(torch.float32)
    xc = x - mean
    if corr:
        norm64 = torch.linalg.vector_norm(xc, dim=1, keepdim=True, dtype=torch.float64)
        norm = norm64.to(torch.float32)
        normal = norm64 >= _TINY
        tiny = ~normal & (norm64 > 0)  # subnormal norm: divided in float64 (see _numpy.prepare_rows)
        small = torch.where(tiny, xc.to(torch.float64) / torch.where(tiny, norm64, 1.0), 0.0).to(torch.float32)
        xc.mul_(torch.where(normal, 1.0 / norm, torch.zeros_like(norm)))
        xc.add_(small)
    return xc


class _PinnedStager:
    """Host blocks to a CUDA device through two pinned buffers and a side stream.

    A block is copied (torch's multi-threaded CPU copy) into the pinned buffer not used by the previous
    block, then sent to the device on the side stream; the compute stream waits for that copy only (an
    event), so the transfer overlaps whatever was already launched. A buffer is refilled only after its
    previous transfer finished."""

    def __init__(self, torch: Any, device: Any):
        self.t, self.device = torch, device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: list[Any] = [None, None]
        self.sent: list[Any] = [None, None]
        self.turn = 0

    def __call__(self, block: np.ndarray) -> Any:
        t = self.t
        i, self.turn = self.turn, 1 - self.turn
        if self.sent[i] is not None:
            self.sent[i].synchronize()  # the pinned pages still feed an earlier transfer until then
        if self.buffers[i] is None or self.buffers[i].numel() < block.size:
            self.buffers[i] = t.empty(max(block.size, 1), dtype=t.float32, pin_memory=True)
        host = self.buffers[i][: block.size].view(block.shape)
        host.copy_(_from_numpy(t, block))
        compute = t.cuda.current_stream(self.device)
        with t.cuda.stream(self.stream):
            dev = t.empty(block.shape, dtype=t.float32, device=self.device)
            dev.copy_(host, non_blocking=True)
            done = t.cuda.Event()
            done.record(self.stream)
        self.sent[i] = done
        compute.wait_event(done)
        dev.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return dev


class _Selection:
    """One side's running top-k for m queries, on the device: ``keys`` (m, k) (score for ``pos``, −score
    for ``neg``) and ``rows`` (m, k) int64, in the order (key desc, row asc); unfilled slots hold
    (−inf, _NO_ROW)."""

    def __init__(self, torch: Any, m: int, k: int, sign: int, device: Any):
        self.t, self.k, self.sign = torch, k, sign
        self.keys = torch.full((m, k), -np.inf, dtype=torch.float32, device=device)
        self.rows = torch.full((m, k), _NO_ROW, dtype=torch.int64, device=device)
        # Above this many candidates in one query, cut the tile at its own k-th first (step 2): merging
        # sorts k + c_max entries per query, which must stay O(k), never O(tile).
        self.cap = 2 * k + 64

    def mask(self, scores: Any, threshold: Any = None) -> Any:
        """Scores (m, r) whose key reaches the threshold (default: each query's running k-th key)."""
        thr = self.keys[:, -1:] if threshold is None else threshold
        return scores >= thr if self.sign > 0 else scores <= -thr  # key = −score ≥ thr ⟺ score ≤ −thr

    def fold(self, scores: Any, mask: Any, counts: Any, c_max: int, base: int) -> None:
        """Merge the candidates of a tile: scores (m, r) of rows ``base .. base + r``."""
        t = self.t
        if c_max == 0:
            return
        if c_max > self.cap:
            kk = min(self.k, scores.shape[1])
            ext = scores.topk(kk, dim=1, largest=self.sign > 0, sorted=False).values
            tile_kth = ext.amin(1, keepdim=True) if self.sign > 0 else -ext.amax(1, keepdim=True)
            mask = self.mask(scores, t.maximum(self.keys[:, -1:], tile_kth))
            counts = mask.sum(1, dtype=t.int32)
            c_max = int(counts.max())
        q, c = mask.nonzero(as_tuple=True)  # row-major: within a query the rows ascend
        slot = t.arange(q.numel(), device=q.device) - (counts.cumsum(0) - counts)[q]
        m = scores.shape[0]
        keys = t.full((m, c_max), -np.inf, dtype=t.float32, device=scores.device)
        rows = t.full((m, c_max), _NO_ROW, dtype=t.int64, device=scores.device)
        vals = scores[q, c]
        keys[q, slot] = vals if self.sign > 0 else -vals
        rows[q, slot] = c + base
        self._merge(keys, rows)

    def _merge(self, keys: Any, rows: Any) -> None:
        """Keep the k best of (running ∪ new) by (key desc, row asc): sort by row (rows are distinct within
        a query, pads aside, which are all alike), then a stable sort by key."""
        keys = self.t.cat([self.keys, keys], dim=1)
        rows = self.t.cat([self.rows, rows], dim=1)
        order = rows.argsort(dim=1)
        keys, rows = keys.gather(1, order), rows.gather(1, order)
        order = keys.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.keys, self.rows = keys.gather(1, order), rows.gather(1, order)


@dataclasses.dataclass
class _Launched:
    """A tile whose matmul, masks and counts are queued on the device; ``c_max`` syncs when read."""

    scores: Any
    base: int
    masks: dict[str, Any]
    counts: dict[str, Any]
    c_max: Any


class _Engine:
    """Prepared queries and each side's running selection: launch a tile, complete it, read the result."""

    def __init__(self, torch: Any, qp: np.ndarray, k: int, sides: Sequence[str], device: Any, allow_tf32: bool):
        self.t, self.device, self.k, self.allow_tf32 = torch, device, int(k), bool(allow_tf32)
        self.qp = _from_numpy(torch, np.ascontiguousarray(qp, np.float32)).to(device, copy=True)
        m = self.qp.shape[0]
        self.sel = {s: _Selection(torch, m, self.k, 1 if s == "pos" else -1, device) for s in sides}
        self.tile = max(256, _TILE_VALUES["cuda" if device.type == "cuda" else "cpu"] // max(m, 1))
        self.rows_seen = 0
        # Per query: a NaN score was seen (the masks never admit NaN, so it is noted here; read in result).
        self.nan = torch.zeros(m, dtype=torch.bool, device=device)

    def launch_scores(self, scores: Any, base: int) -> _Launched:
        self.nan |= scores.isnan().any(dim=1)
        masks = {s: sel.mask(scores) for s, sel in self.sel.items()}
        counts = {s: mk.sum(1, dtype=self.t.int32) for s, mk in masks.items()}
        return _Launched(scores, base, masks, counts, self.t.stack([c.max() for c in counts.values()]))

    def launch(self, rows: Any, base: int) -> _Launched:
        """Queue the matmul of prepared rows (r, K) and the threshold masks; no host sync."""
        with _matmul_precision(self.t, self.allow_tf32):
            scores = self.qp @ rows.T  # (m, r)
        return self.launch_scores(scores, base)

    def complete(self, tile: _Launched) -> None:
        for (side, sel), c_max in zip(self.sel.items(), tile.c_max.tolist()):  # the tile's one sync
            sel.fold(tile.scores, tile.masks[side], tile.counts[side], int(c_max), tile.base)

    def tiles(self, rows: Any, base: int) -> Iterator[_Launched]:
        """Launch tile after tile of prepared rows, each after the previous one is completed."""
        for r0 in range(0, rows.shape[0], self.tile):
            yield self.launch(rows[r0 : r0 + self.tile], base + r0)

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.rows_seen < self.k:
            raise InvalidInputError(f"k={self.k} exceeds the number of rows {self.rows_seen}; use a smaller k")
        nan = self.nan.cpu().numpy()
        if nan.any():
            raise score_overflow_error(int(np.flatnonzero(nan)[0]))
        out = {}
        for side, sel in self.sel.items():
            keys = sel.keys if side == "pos" else -sel.keys
            out[side] = (sel.rows.cpu().numpy().astype(np.int64, copy=True), keys.cpu().numpy().astype(np.float32, copy=True))
        return check_scores(out)


def _column_error(shape: tuple[int, ...], k_cols: int) -> InvalidInputError:
    return InvalidInputError(
        f"block has shape {shape} but the queries have {k_cols} columns; score with the columns both have"
    )


class TorchTopK(Accumulator):
    """The streaming accumulator of ``backend="torch"``: ``push_block(offset, block)``,
    ``push_scores(offset, scores)``, ``finish()``, like the Rust ``TopKAccumulator``.

    ``device``: a torch device (default ``"cuda"`` when available, else ``"cpu"``). ``allow_tf32``: let
    cuBLAS use TF32 for the fp32 matmul (about 10 significant bits: scores and near-tie orders then differ
    from the other backends), off by default.
    """

    def __init__(self, queries: np.ndarray, k: int, measure: str = "cov", sides: tuple[str, ...] = SIDES,
                 queries_prepared: bool = False, *, device: Any = None, allow_tf32: bool = False):
        torch = _torch()
        self.t, self.device = torch, _device(torch, device)
        q = np.ascontiguousarray(queries, np.float32)
        self.corr, self.num_columns = measure == "corr", q.shape[1]
        with torch.no_grad():
            self.engine = _Engine(torch, q if queries_prepared else prepare_queries(q, measure), k, tuple(sides),
                                  self.device, allow_tf32)
        self._stage = _PinnedStager(torch, self.device) if self.device.type == "cuda" else None
        # (offset, prepared rows on the device) of the last block, scored on the next push or in finish. Rows
        # are prepared at once (a new tensor), so the caller may reuse its block buffer when push_block returns.
        self._pending: tuple[int, Any] | None = None

    def _to_device(self, block: np.ndarray) -> Any:
        if self._stage is not None:
            return self._stage(block)
        return _from_numpy(self.t, block).to(self.device)

    def _pending_tiles(self) -> Iterator[_Launched]:
        if self._pending is None:
            return iter(())
        offset, prepared = self._pending
        self._pending = None
        return self.engine.tiles(prepared, offset)

    def push_block(self, offset: int, block: np.ndarray) -> None:
        """Score the rows ``offset .. offset + R`` of a (R, K) float32 block (any order of blocks)."""
        block = np.ascontiguousarray(block, np.float32)
        if block.ndim != 2 or block.shape[1] != self.num_columns:
            raise _column_error(block.shape, self.num_columns)
        if block.shape[0] == 0:
            return
        with self.t.no_grad():
            pending = self._pending_tiles()
            first = next(pending, None)  # the previous block's first matmul, queued on the device ...
            staged = self._to_device(block)  # ... while this block is copied and sent (its prep queued after)
            if first is not None:
                self.engine.complete(first)
                for tile in pending:
                    self.engine.complete(tile)
            self._pending = (int(offset), _prepare_rows(self.t, staged, self.corr))
            self.engine.rows_seen += block.shape[0]

    def push_scores(self, offset: int, scores: np.ndarray) -> None:
        """Fold precomputed scores of rows ``offset .. offset + R``: (R,) for one query, or (R, m)."""
        s = np.ascontiguousarray(scores, np.float32)
        s = s[:, None] if s.ndim == 1 else s
        m = self.engine.qp.shape[0]
        if s.ndim != 2 or s.shape[1] != m:
            raise InvalidInputError(f"scores have shape {np.shape(scores)} but the accumulator has {m} queries")
        if s.shape[0] == 0:
            return
        with self.t.no_grad():
            dev = _from_numpy(self.t, np.ascontiguousarray(s.T)).to(self.device)
            self.engine.complete(self.engine.launch_scores(dev, int(offset)))
            self.engine.rows_seen += s.shape[0]

    def finish(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{side: (indices (m, k) int64, scores (m, k) float32)}``."""
        with self.t.no_grad():
            for tile in self._pending_tiles():
                self.engine.complete(tile)
            return self.engine.result()


def _check_finite(x: np.ndarray, offset: int) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        row = offset + int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInputError(f"train losses hold NaN or inf (row {row}); scores of NaN have no order")


class TorchScorer:
    """Train rows prepared once (``cov`` or ``corr``) and kept on a torch device, for repeated top-k.

    Streaming reads and prepares every block on every query batch; this pays that once and then costs one
    matmul per tile plus the selection (the same one as :class:`TorchTopK`, so the same answer). Memory:
    n × K float32 on the device (10M × 256: 10 GB).

    >>> import numpy as np
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3) ** 2
    >>> s = TorchScorer.from_blocks([(0, x)], "corr", device="cpu")   # doctest: +SKIP
    >>> s.topk(x[:1], k=2)["pos"][0]                                    # doctest: +SKIP
    array([[0, 1]])
    """

    def __init__(self, rows: Any, measure: str, *, allow_tf32: bool = False):
        self.t = _torch()
        self.rows, self.measure, self.allow_tf32 = rows, measure, bool(allow_tf32)
        self.device = rows.device

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[int, np.ndarray]], measure: str = "cov", *, n_rows: int | None = None,
                    device: Any = None, allow_tf32: bool = False) -> TorchScorer:
        """Prepare ``(offset, block)`` row blocks (any order; together rows 0 .. n − 1) on ``device``.

        With ``n_rows`` the matrix is allocated once; without it the prepared blocks are concatenated at
        the end (twice the memory for a moment)."""
        if measure not in KERNEL_MEASURES:
            raise InvalidInputError(f"kernel measure must be one of {KERNEL_MEASURES}, not {measure!r}")
        torch = _torch()
        dev = _device(torch, device)
        stage = _PinnedStager(torch, dev) if dev.type == "cuda" else None
        out: Any = None
        pieces: list[tuple[int, Any]] = []
        seen, k_cols = 0, None
        with torch.no_grad():
            for offset, block in blocks:
                block = np.ascontiguousarray(block, np.float32)
                if block.ndim != 2 or (k_cols is not None and block.shape[1] != k_cols):
                    raise _column_error(block.shape, k_cols if k_cols is not None else -1)
                k_cols = block.shape[1]
                if block.shape[0] == 0:
                    continue
                _check_finite(block, offset)
                raw = stage(block) if stage is not None else _from_numpy(torch, block).to(dev)
                prepared = _prepare_rows(torch, raw, measure == "corr")
                if n_rows is None:
                    pieces.append((int(offset), prepared))
                else:
                    if offset < 0 or offset + block.shape[0] > n_rows:
                        raise InvalidInputError(f"rows {offset}..{offset + block.shape[0]} lie outside 0..{n_rows}")
                    if out is None:
                        out = torch.empty((n_rows, k_cols), dtype=torch.float32, device=dev)
                    out[offset : offset + block.shape[0]] = prepared
                seen += block.shape[0]
            if n_rows is None:
                pieces.sort(key=lambda p: p[0])
                starts = np.cumsum([0] + [p[1].shape[0] for p in pieces])
                if [p[0] for p in pieces] != starts[:-1].tolist():
                    raise InvalidInputError("the blocks must cover rows 0 .. n - 1 once each, without gaps or overlaps")
                out = pieces[0][1] if len(pieces) == 1 else (torch.cat([p[1] for p in pieces]) if pieces else None)
            elif seen != n_rows:
                raise InvalidInputError(f"the blocks hold {seen} rows, not n_rows={n_rows}")
        if out is None or out.shape[0] == 0 or k_cols is None or k_cols < 2:
            raise InvalidInputError("no train rows to keep (or fewer than 2 columns)")
        return cls(out, measure, allow_tf32=allow_tf32)

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_columns(self) -> int:
        return int(self.rows.shape[1])

    def topk(self, queries: np.ndarray, k: int, sides: Sequence[str] = SIDES,
             queries_prepared: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{side: (indices (m, k) int64, scores (m, k) float32)}`` of queries (m, K) against the rows (a
        query whose cov scores all underflowed is a ScoreUnderflowError, as in :func:`~daunce_store.scoring.topk`)."""
        return check_underflow(self.select(queries, k, sides, queries_prepared), queries, queries_prepared, self.measure)

    def select(self, queries: np.ndarray, k: int, sides: Sequence[str] = SIDES,
               queries_prepared: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`topk` without the underflow check (for callers that make it with the queries' names)."""
        sides = tuple(sides)
        if not sides or set(sides) - set(SIDES):
            raise InvalidInputError(f"sides must be a non-empty subset of {SIDES}, not {sides!r}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a whole number >= 1, not {k!r}")
        if k > self.n_rows:
            raise InvalidInputError(f"k={k} exceeds the number of rows {self.n_rows}; use a smaller k")
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] != self.num_columns:
            raise InvalidInputError(f"queries must be an (m, {self.num_columns}) array, not shape {q.shape}")
        if not np.isfinite(q).all():
            raise InvalidInputError("queries hold NaN or inf; scores of NaN have no order")
        with self.t.no_grad():
            engine = _Engine(self.t, q if queries_prepared else prepare_queries(q, self.measure), int(k), sides,
                             self.device, self.allow_tf32)
            for tile in engine.tiles(self.rows, 0):
                engine.complete(tile)
            engine.rows_seen = self.n_rows
            return engine.result()
