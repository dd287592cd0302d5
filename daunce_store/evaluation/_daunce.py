"""Daunce on the evaluation testbeds: fill a store with the perturbation runner, read dense score matrices.

The scores come from the store exactly as a user gets them: :func:`fill_store` runs
:func:`daunce_store.perturb.run_worker` (DESIGN §1) and the evaluations score with the public
``store.scores(query_set, measure=..., columns=positions)``, so a score matrix's column j ranks like
``store.topk`` for query j.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import daunce_store
from daunce_store.scoring import MEASURES as SCORE_MEASURES
from daunce_store.errors import InvalidInputError

__all__ = ["MEASURES", "SELF_MEASURES", "fill_store", "column_groups", "num_scored_columns", "default_config"]

#: The score measures the evaluations compare (DESIGN §1, §1.1); the "-corr" forms divide by the square
#: root of the train example's self-score (the normalised forms, for retrieval).
MEASURES = tuple(SCORE_MEASURES)  # every score measure (the one vocabulary: daunce_store.scoring)
#: The measures a self-score (self-influence) exists for.
SELF_MEASURES = tuple(name for name, m in SCORE_MEASURES.items() if not m.normalized)  # a self-score of 1 says nothing


def default_config(**changes: Any) -> Any:
    """The perturbation config the evaluations use for the small classifiers (IF objective, r = 0.3,
    ρ = γ = 1; the fine-tune settings were picked on LDS, see bench/RESULTS.md). The fine-tune keeps the
    target's own L2 penalty, which :func:`fill_store` hands to the task (``weight_decay=None``: from the
    task)."""
    from daunce_store.perturb import PerturbConfig

    base: dict[str, Any] = dict(objective="if", ratio=0.3, rho=1.0, gamma=1.0, epochs=20, batch_size=64, lr=3e-3,
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
    weight_decay: float = 1e-3,
    seed: int = 0,
    progress: Any = True,
    train_ids: Sequence[str] | None = None,
) -> daunce_store.Store:
    """Create a store at ``path`` and commit perturbations 0..k-1 of ``model`` (θ0) into it.

    ``query_sets`` maps a query-set name to its (x, y) arrays; ``weight_decay`` is the L2 penalty θ0 was
    fitted with (``fit``'s), kept in the perturbed objective; ``progress`` is a bool or a runner
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
        store, model, ClassificationTask(signal=signal, weight_decay=weight_decay), dataset(x_train, y_train),
        {name: dataset(*xy) for name, xy in query_sets.items()}, config or default_config(),
        until=k, progress=progress,
    )
    return store


def num_scored_columns(store: daunce_store.Store, query_set: str) -> int:
    """How many committed columns have losses for ``query_set`` (the positions ``store.scores`` takes)."""
    return len(store.snapshot().query_slots.get(query_set, ()))


def column_groups(store: daunce_store.Store, query_set: str, k: int, max_groups: int = 8) -> list[list[int]]:
    """Disjoint groups of ``k`` column positions (0..K-1 among the columns with losses for ``query_set``,
    as ``store.scores(columns=...)`` takes them), at most ``max_groups``: scoring each group separately
    gives the spread of a K-column estimate."""
    total = num_scored_columns(store, query_set)
    if k > total:
        raise InvalidInputError(f"asked for groups of {k} columns but the store has {total} for {query_set!r}")
    return [list(range(g * k, (g + 1) * k)) for g in range(min(max_groups, total // k))]
