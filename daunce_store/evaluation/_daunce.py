"""Daunce on the digits testbed: fill a store with the perturbation runner, read dense score matrices.

The scores come from the store exactly as a user gets them: :func:`fill_store` runs
:func:`daunce_store.perturb.run_worker` (DESIGN §1) and :func:`score_matrix` applies the kernel's own row
preparation (``prepare_rows`` / ``prepare_queries``) to ``store.train_losses()`` and
``store.query_losses()``, so ``score_matrix(...)[i, j]`` is the value ``store.topk`` ranks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import daunce_store
from daunce_store.errors import InvalidInputError
from daunce_store.scoring._numpy import prepare_queries, prepare_rows

__all__ = ["fill_store", "score_matrix", "column_groups", "default_config"]


def default_config(**changes: Any) -> Any:
    """The perturbation config the evaluations use for the digits classifiers (IF objective,
    r = 0.3, ρ = γ = 1; the fine-tune settings were picked on LDS, see bench/RESULTS.md)."""
    from daunce_store.perturb import PerturbConfig

    base = dict(objective="if", ratio=0.3, rho=1.0, gamma=1.0, epochs=20, batch_size=64, lr=3e-3,
                optimizer="adam", scheduler="cosine", warmup_ratio=0.0, eval_batch_size=2048, device="cpu")
    base.update(changes)
    return PerturbConfig(**base)


def fill_store(
    path: str | os.PathLike[str],
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    query_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    *,
    config: Any = None,
    signal: str = "loss",
    seed: int = 0,
    progress: Any = True,
    train_ids: Sequence[str] | None = None,
) -> daunce_store.LossStore:
    """Create a store at ``path`` and commit perturbations 0..k-1 of ``model`` (θ0) into it.

    ``query_sets`` maps a query-set name to its (x, y) arrays; ``progress`` is a bool or a runner
    ``Reporter``. Returns the store.
    """
    import torch

    from daunce_store.perturb import ClassificationTask, run_worker

    if k < 2:
        raise InvalidInputError(f"k={k}: Daunce needs at least 2 perturbations")
    ids = list(train_ids) if train_ids is not None else [f"train-{i}" for i in range(len(y_train))]
    store = daunce_store.init(
        path, ids, {name: [f"{name}-{j}" for j in range(len(xy[1]))] for name, xy in query_sets.items()},
        seed=seed, capacity=max(2, k),
    )

    def dataset(x: np.ndarray, y: np.ndarray) -> Any:
        return torch.utils.data.TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))

    run_worker(
        store, model, ClassificationTask(signal=signal), dataset(x_train, y_train),
        {name: dataset(*xy) for name, xy in query_sets.items()}, config or default_config(),
        until=k, progress=progress,
    )
    return store


def column_groups(store: daunce_store.LossStore, query_set: str, k: int, max_groups: int = 8) -> list[list[int]]:
    """Disjoint groups of ``k`` committed slots (with losses for ``query_set``), at most ``max_groups``:
    scoring each group separately gives the spread of a K-column estimate."""
    slots = list(store.snapshot().query_slots.get(query_set, ()))
    if k > len(slots):
        raise InvalidInputError(f"asked for groups of {k} columns but the store has {len(slots)} for {query_set!r}")
    return [slots[g * k : (g + 1) * k] for g in range(min(max_groups, len(slots) // k))]


def score_matrix(store: daunce_store.LossStore, query_set: str, measure: str = "cov", *, columns: Sequence[int] | None = None) -> np.ndarray:
    """Dense (n_train, m) Daunce scores of ``query_set`` over ``columns`` (slots; default all committed)."""
    if measure not in ("cov", "corr"):
        raise InvalidInputError(f"measure must be 'cov' or 'corr', not {measure!r}")
    if columns is None:
        columns = list(store.snapshot().query_slots.get(query_set, ()))
    train = store.train_losses(columns=columns)
    query = store.query_losses(query_set, columns=columns)
    return prepare_rows(train, measure).astype(np.float64) @ prepare_queries(query, measure).astype(np.float64).T
