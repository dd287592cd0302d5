"""The public façade: :class:`Store`, a :class:`~daunce_store.store.LossStore` that also scores.

The store package knows nothing of scoring; this module sits on top of both (imports run one way:
store ← scoring ← this façade), so the methods users call most have real signatures.

>>> import daunce_store
>>> store = daunce_store.open("attrib.zarr")                                  # doctest: +SKIP
>>> store.topk("test", ["q17"], k=10).to_pandas()                             # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from daunce_store import _constants as C
from daunce_store import _select, scoring
from daunce_store._select import Remove, Selection, Write
from daunce_store.errors import InvalidInputError
from daunce_store.scoring import DEFAULT_MEASURE, TOPK_MEASURE, Attribution, BackendChoice, Scores, SideChoice, Stability, StoreScorer
from daunce_store.store import LossStore, OpenMode, Snapshot, Storage

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["Store", "init", "open"]

StoreT = TypeVar("StoreT", bound="Store")  # create/open return the subclass they are called on (serve's ServedStore)

#: The recipes' factories (``daunce_store.perturb._recipes.RECIPES``) live in this module; named here as text
#: so that reading a recipe store's files needs no torch.
RECIPE_MODULE = "daunce_store.perturb._recipes"


class Store(LossStore):
    """A daunce store with scoring: what :func:`daunce_store.open` and :func:`daunce_store.init` return.

    ``measure`` everywhere is one of :data:`daunce_store.scoring.MEASURE_NAMES` (``auto``: nystrom when
    every column records its perturbation draw, else whitened; ``auto-corr``: their normalised forms), by
    default ``auto`` (best LDS) and for :meth:`topk` ``auto-corr`` (lists read by people); ``backend`` is auto, rust, numba, numpy or
    torch (the same answer from each; auto never picks torch); ``columns`` are positions 0..K-1 of the
    snapshot's columns for the query set (a position may repeat: a bootstrap resample).

    ``client`` (``topk``, ``influence``, ``self_influence``): a ``distributed.Client`` or a Dask scheduler
    address (``tcp://HOST:PORT``) to scan the train rows on that cluster instead of in this process, with the
    same answer; one task per partition of about ``partition_rows`` rows (default 4M), each opening the
    store's URL with the storage options this handle was opened with. Needs the ``dask`` extra.
    """

    _storage_options: dict[str, Any] | None = None

    def __init__(self, storage: Storage, mode: OpenMode = "a"):
        super().__init__(storage, mode)
        self._kept: dict[str, Any] = {}  # attribute's models, per device
        # One attribute call at a time per Store: the kept models swap each adapter's weights into one model in place.
        self._kept_lock = threading.Lock()

    @classmethod
    def create(
        cls: type[StoreT], url: str | os.PathLike[str], train_ids: Sequence[str] | np.ndarray,
        query_sets: Mapping[str, Sequence[str] | np.ndarray] | None = None, *, seed: int = 0,
        capacity: int = C.DEFAULT_CAPACITY, chunk_rows: int = C.DEFAULT_CHUNK_ROWS, pack_width: int | None = None,
        storage_options: dict[str, Any] | None = None, attributes: Mapping[str, Any] | None = None,
    ) -> StoreT:
        store = super().create(url, train_ids, query_sets, seed=seed, capacity=capacity, chunk_rows=chunk_rows,
                               pack_width=pack_width, storage_options=storage_options, attributes=attributes)
        store._storage_options = storage_options  # what distributed scans open the URL with
        return store

    @classmethod
    def open(cls: type[StoreT], url: str | os.PathLike[str], mode: OpenMode = "a",
             storage_options: dict[str, Any] | None = None) -> StoreT:
        store = super().open(url, mode, storage_options)
        store._storage_options = storage_options
        return store

    # The checker sees the functions, not the classmethod objects around them (which have __func__).
    create.__func__.__doc__ = LossStore.create.__doc__  # type: ignore[attr-defined]
    open.__func__.__doc__ = LossStore.open.__doc__  # type: ignore[attr-defined]

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The object-store options this handle was opened with (None: none, or a local path)."""
        return self._storage_options

    def topk(
        self, query_set: str, queries: Sequence[str] | None = None, *, k: int = 10, measure: str = TOPK_MEASURE,
        side: SideChoice = "both", backend: BackendChoice = "auto", snapshot: Snapshot | None = None,
        columns: Sequence[int] | None = None, block_rows: int | None = None,
        client: Client | str | None = None, partition_rows: int | None = None,
    ) -> Attribution:
        """Top-k proponents (``pos``) and opponents (``neg``) among the train examples for each query.
        The default measure, ``auto-corr`` (:data:`~daunce_store.scoring.TOPK_MEASURE`), keeps the same
        high-leverage rows from heading unrelated queries' lists; curation (:meth:`influence`,
        :meth:`select`, :meth:`scores`) defaults to the LDS-best ``auto``.

        >>> store.topk("test", ["q0"], k=5, measure="nystrom").to_pandas()   # doctest: +SKIP
        >>> store.topk("test", k=5, client="tcp://10.0.0.5:8786")           # doctest: +SKIP
        """
        return scoring.topk_store(self, query_set, queries, k=k, measure=measure, side=side, backend=backend, snapshot=snapshot,
                                  columns=columns, block_rows=block_rows, client=client, partition_rows=partition_rows,
                                  storage_options=self.storage_options)

    def influence(
        self, query_set: str, queries: Sequence[str] | None = None, *, k: int = 10, measure: str = DEFAULT_MEASURE,
        side: SideChoice = "both", backend: BackendChoice = "auto", snapshot: Snapshot | None = None,
        columns: Sequence[int] | None = None, client: Client | str | None = None, partition_rows: int | None = None,
    ) -> Attribution:
        """Aggregate influence on a whole query set (the mean score over its queries), top-k per side."""
        return scoring.influence(self, query_set, queries, k=k, measure=measure, side=side, backend=backend, snapshot=snapshot,
                                 columns=columns, client=client, partition_rows=partition_rows,
                                 storage_options=self.storage_options)

    def self_influence(
        self, *, k: int = 10, measure: str = DEFAULT_MEASURE, side: SideChoice = "pos", backend: BackendChoice = "auto",
        snapshot: Snapshot | None = None, block_rows: int | None = None,
        client: Client | str | None = None, partition_rows: int | None = None,
    ) -> Attribution:
        """Self-influence ū_iᵀ M ū_i (``cov``: the loss variance): top-k, for mislabel and outlier search."""
        return scoring.self_influence(self, k=k, measure=measure, side=side, backend=backend, snapshot=snapshot,
                                      block_rows=block_rows, client=client, partition_rows=partition_rows,
                                      storage_options=self.storage_options)

    def recipe_config(self, snapshot: Snapshot | None = None) -> dict[str, Any] | None:
        """The run config behind the newest committed column when a recipe made it (``daunce perturb
        --recipe``): its PerturbConfig fields as recorded, ``factory_kwargs`` holding the model, the data
        files (``train``, ``queries`` {name: file}) and the field names; None for any other store."""
        commits = (snapshot or self.snapshot()).commits
        config = commits[-1].metadata.get("config") if commits else None
        if not isinstance(config, dict) or not str(config.get("factory") or "").startswith(RECIPE_MODULE + ":"):
            return None
        return config

    def data_files(self, snapshot: Snapshot | None = None) -> dict[str, str]:
        """The data files a recipe store was built from, as recorded (absolute paths): ``{"train": file,
        <query set>: file, ...}``; empty for a store no recipe made. They may have moved since."""
        config = self.recipe_config(snapshot)
        kwargs = (config or {}).get("factory_kwargs") or {}
        files = {"train": kwargs["train"]} if isinstance(kwargs.get("train"), str) else {}
        queries = kwargs.get("queries") or {}
        if isinstance(queries, dict):
            files.update({str(name): path for name, path in queries.items() if isinstance(path, str)})
        return files

    def persist_matrices(self, measure: str = DEFAULT_MEASURE) -> list[tuple[str, int]]:
        """Persist ``measure``'s K × K matrix, and the row scales of its ``-corr`` form, for every column set
        scoring asks for (all committed columns, each query set's), one pass each where the store holds none
        yet, so that read-only scoring (the CLI, a server, Dask) starts without that pass and scores ``-corr``
        at cov's cost; returns (kind, K) per set. ``daunce compact`` runs it."""
        from daunce_store.scoring._measures import persist_grams

        self._require_writable()
        return persist_grams(self, measure)

    def stability(
        self, query_set: str, queries: Sequence[str] | None = None, *, k: int = 10, measure: str = DEFAULT_MEASURE,
        side: SideChoice = "both", fractions: Sequence[float] = (0.25, 0.5, 1.0), bootstrap: int = 20, seed: int = 0,
        backend: BackendChoice = "auto", snapshot: Snapshot | None = None, block_rows: int | None = None,
    ) -> Stability:
        """Has K converged? Top-k overlap over nested column subsets and bootstrap standard errors."""
        return scoring.stability(self, query_set, queries, k=k, measure=measure, side=side, fractions=fractions,
                                 bootstrap=bootstrap, seed=seed, backend=backend, snapshot=snapshot, block_rows=block_rows)

    def scores(
        self, query_set: str, queries: Sequence[str] | None = None, *, measure: str = DEFAULT_MEASURE,
        aggregate: Literal["mean"] | None = None, snapshot: Snapshot | None = None, columns: Sequence[int] | None = None,
        block_rows: int | None = None,
    ) -> Scores:
        """Dense scores of every train example per query (or their mean), in row blocks or as a frame."""
        return scoring.scores(self, query_set, queries, measure=measure, aggregate=aggregate, snapshot=snapshot,
                              columns=columns, block_rows=block_rows)

    def select(
        self, query_set: str, queries: Sequence[str] | None = None, *, remove: Remove = "harmful",
        top: int, measure: str = DEFAULT_MEASURE, write: Write = "kept",
        data: str | os.PathLike[str] | None = None, output: str | os.PathLike[str] | None = None,
        ids_output: str | os.PathLike[str] | None = None, backend: BackendChoice = "auto",
    ) -> Selection:
        """Drop the ``top`` train examples most ``harmful`` to the query set (opponents: removing them should
        lower its loss) or most ``helpful`` (proponents), ranked as :meth:`influence` ranks them, and return
        the ``kept`` (or ``removed``) rows; with ``data`` (jsonl, json, csv, parquet; rows matched by an ``id``
        column, else by row number) they are that file's rows, written to ``output`` in its format with the
        ids beside it (``ids_output``, default ``OUTPUT.ids.txt``). ``.to_pandas()`` gives the rows.

        >>> store.select("test", remove="harmful", top=50, data="train.jsonl", output="keep.jsonl")   # doctest: +SKIP
        """
        return _select.select(self, query_set, queries, remove=remove, top=top, measure=measure, write=write, data=data,
                              output=output, ids_output=ids_output, backend=backend)

    def attribute(
        self, rows: Sequence[Mapping[str, Any]] | None = None, *, prompt: str | None = None, completion: str | None = None,
        k: int = 10, measure: str = TOPK_MEASURE, side: SideChoice = "both", backend: BackendChoice = "auto", device: str = "cpu",
    ) -> Attribution:
        """Top-k train examples for NEW examples, not in any query set: each is evaluated under the K perturbed
        models the store kept (a recipe run's LoRA adapters: K forward passes, no gradients) and its losses are
        scored against the train rows. ``rows`` hold the run's fields (prompt/completion or messages; text/label)
        and an optional ``id``; or give one ``prompt`` and ``completion``. The model and adapters stay loaded
        on this Store, so later calls pay only the forward passes. Needs the ``train`` extra.

        >>> store.attribute(prompt="What is a list?", completion="A mutable sequence.").to_pandas()   # doctest: +SKIP
        """
        rows = _new_rows(rows, prompt, completion)
        with self._kept_lock:
            kept = self._kept_models(device)
            losses = kept.losses(rows)
        names = [str(r["id"]) if r.get("id") is not None else f"new-{i}" for i, r in enumerate(rows)]
        return scoring.topk_losses(self, losses, names, kept.slots, k=k, measure=measure, side=side, backend=backend,
                                   snapshot=kept.snapshot)

    def attribute_support(self, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """Whether :meth:`attribute` can run on this store here, from the commit records alone (nothing loaded):
        ``{"available": bool, "recipe": "causal-lm" | "classifier" | None, "reason": one line or None}``."""
        config = self.recipe_config(snapshot)
        recipe = str(config["factory"]).rsplit(":", 1)[-1].replace("_", "-") if config else None
        commits = (snapshot or self.snapshot()).commits
        if config is None:
            reason = ("no committed columns yet" if not commits else
                      "this store was not made by a recipe (daunce perturb --recipe ...): it keeps no models to evaluate new examples under")
        elif not any(c.metadata.get("adapter") for c in commits):
            reason = "its run kept no adapters (keep_adapters: false); rerun `daunce perturb --recipe ...` into a new store"
        elif missing := _missing_train_packages():
            reason = f"this install lacks {', '.join(missing)}: pip install 'daunce-store[train]'"
        else:
            reason = None
        return {"available": reason is None, "recipe": recipe, "reason": reason}

    def _kept_models(self, device: str) -> Any:
        """The recipe's θ0 and kept adapters, loaded once per Store and device; refreshed when columns land."""
        from daunce_store._optional import import_optional

        import_optional("torch", "train", "Store.attribute")
        from daunce_store.perturb import KeptModels

        snap = self.snapshot()
        cache = self._kept
        kept = cache.get(device)
        if kept is None or kept.snapshot.perturbations != snap.perturbations:
            kept = cache[device] = KeptModels(self, snapshot=snap, device=device, reuse=kept)
        return kept

    def scorer(
        self, query_set: str | None = None, *, measure: str = DEFAULT_MEASURE, device: str | None = None,
        snapshot: Snapshot | None = None, columns: Sequence[int] | None = None, allow_tf32: bool = False,
        block_rows: int | None = None,
    ) -> StoreScorer:
        """Train rows read once, prepared for ``measure`` and kept on a torch device (default cuda when there
        is one), answering ``.topk(queries, k=...)`` / ``.topk_losses(losses, k=...)`` without reading them
        again. Needs torch (``pip install 'daunce-store[torch]'``).

        >>> s = store.scorer("test", device="cuda"); s.topk(["q0"], k=5).to_pandas()   # doctest: +SKIP
        """
        return scoring.scorer(self, query_set, measure=measure, device=device, snapshot=snapshot, columns=columns,
                              allow_tf32=allow_tf32, block_rows=block_rows)


@functools.cache
def _missing_train_packages() -> list[str]:
    """The perturbation extra's packages this install lacks (asked once: serve polls attribute_support)."""
    return [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]


def _new_rows(rows: Sequence[Mapping[str, Any]] | None, prompt: str | None, completion: str | None) -> list[dict[str, Any]]:
    if rows is not None and (prompt is not None or completion is not None):
        raise InvalidInputError("give rows, or prompt and completion, not both")
    if rows is None:
        if prompt is None or completion is None:
            raise InvalidInputError("give the new example: prompt and completion (the output to explain), or rows")
        return [{"prompt": prompt, "completion": completion}]
    out = list(rows)
    if not out or not all(isinstance(r, Mapping) for r in out):
        raise InvalidInputError("rows must be a non-empty list of dicts holding the run's fields (e.g. prompt and completion)")
    ids = [str(r["id"]) for r in out if r.get("id") is not None]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"rows repeat an id ({next(i for i in ids if ids.count(i) > 1)!r}); give each new example its own id")
    return [dict(r) for r in out]


# The entry points: a Store's own constructors (same signatures and docs as LossStore.create / open).
init = Store.create
open = Store.open  # noqa: A001 - the obvious name for the entry point
