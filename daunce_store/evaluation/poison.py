"""Backdoor retrieval and mislabel detection on the digits testbed, for each Daunce score measure.

* Backdoor: a few % of the training images get a pixel-patch trigger (:data:`TRIGGER_PIXELS`) and a fixed
  target label; the model learns "trigger ⇒ target". For triggered test images (true digit ≠ target)
  queried with the target label, the top Daunce proponents should be the poisoned examples:
  precision@k of poisoned examples among them, against random ranking (expected precision = poison rate).
* Mislabels: a few % of the training labels are flipped to another class; self-influence (an example's
  self-score: the variance of its loss across the K perturbed models for cov, ū_iᵀ M ū_i for the
  whitened and Nyström measures) should rank them first. Reported as precision/recall in the top-k,
  against ranking by the target model's own loss (the usual baseline) and random ranking.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.evaluation._digits import (
    ClassificationData,
    add_trigger,
    fit,
    load_digits_split,
    make_model,
    per_example_loss,
    predict_logits,
)

__all__ = [
    "poison_with_trigger",
    "flip_labels",
    "BackdoorResult",
    "MislabelResult",
    "run_backdoor",
    "run_mislabel",
]


def poison_with_trigger(
    data: ClassificationData, fraction: float = 0.03, target: int = 0, seed: int = 0
) -> tuple[ClassificationData, np.ndarray]:
    """Add the trigger to ``fraction`` of the train images whose label is not ``target`` and relabel them
    ``target``. Returns the poisoned data and the sorted indices of the poisoned examples."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must be in (0, 1), not {fraction}")
    candidates = np.flatnonzero(data.y_train != target)
    count = max(1, int(round(fraction * len(data.y_train))))
    idx = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))
    x, y = data.x_train.copy(), data.y_train.copy()
    x[idx] = add_trigger(x[idx])
    y[idx] = target
    return data.replace(x_train=x, y_train=y), idx


def flip_labels(data: ClassificationData, fraction: float = 0.05, seed: int = 0) -> tuple[ClassificationData, np.ndarray]:
    """Flip ``fraction`` of the train labels to a different random class. Returns the noisy data and the
    sorted indices of the flipped examples."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    n = len(data.y_train)
    idx = np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    y = data.y_train.copy()
    c = data.num_classes
    y[idx] = (y[idx] + rng.integers(1, c, size=len(idx))) % c  # never the original class
    return data.replace(y_train=y), idx


def _precision_at(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    return float(np.isin(ranked[:k], relevant).mean())


@dataclasses.dataclass
class BackdoorResult:
    """precision[method][k]: mean over triggered queries of the fraction of poisoned examples in the
    method's top-k proponents. ``random_precision`` is what a random ranking gets in expectation."""

    precision: dict[str, dict[int, float]]
    random_precision: float
    num_poisoned: int
    num_queries: int
    attack_success: float
    clean_accuracy: float
    num_perturbations: int

    def rows(self) -> list[dict[str, Any]]:
        return [{"method": m, **{f"P@{k}": v for k, v in ps.items()}} for m, ps in self.precision.items()]


@dataclasses.dataclass
class MislabelResult:
    """precision[method][k] and recall[method][k] of flipped labels among the top-k of each ranking."""

    precision: dict[str, dict[int, float]]
    recall: dict[str, dict[int, float]]
    random_precision: float
    num_flipped: int
    num_perturbations: int

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for m in self.precision:
            row: dict[str, Any] = {"method": m}
            for k in self.precision[m]:
                row[f"P@{k}"] = self.precision[m][k]
                row[f"R@{k}"] = self.recall[m][k]
            out.append(row)
        return out


def _workdir(workdir: str | Path | None) -> Any:
    if workdir is None:
        return tempfile.TemporaryDirectory()
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return _Keep(Path(workdir))


class _Keep:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc: Any) -> None:
        return None


def run_backdoor(
    *,
    num_perturbations: int = 32,
    fraction: float = 0.03,
    target: int = 0,
    ks: Sequence[int] = (10, 20),
    num_queries: int = 50,
    weight_decay: float = 1e-3,
    config: Any = None,
    measures: Sequence[str] | None = None,
    baselines: bool = False,
    workdir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> BackdoorResult:
    """Poison digits, train the target logistic regression on it, run Daunce and measure precision@k of
    poisoned examples among each triggered query's top proponents under each score measure in
    ``measures`` (default: all of :data:`~daunce_store.evaluation.MEASURES`; ``baselines``: also gradient
    cosine and the exact-Hessian influence function on the same queries)."""
    import torch

    from daunce_store.evaluation._daunce import MEASURES, fill_store

    torch.set_num_threads(1)
    clean = load_digits_split(seed=seed)
    data, poisoned = poison_with_trigger(clean, fraction, target, seed)
    model = fit(make_model("logreg"), data.x_train, data.y_train, weight_decay=weight_decay)
    others = np.flatnonzero(clean.y_test != target)[:num_queries]
    xq = add_trigger(clean.x_test[others])
    yq = np.full(len(others), target, dtype=np.int64)
    attack = float((predict_logits(model, xq).argmax(1) == target).mean())
    clean_acc = float((predict_logits(model, clean.x_test).argmax(1) == clean.y_test).mean())
    kmax = max(ks)
    precision: dict[str, dict[int, float]] = {}
    with _workdir(workdir) as tmp:
        path = Path(tmp) / "backdoor.zarr"
        _remove(path)
        store = fill_store(path, model, data.x_train, data.y_train, {"triggered": (xq, yq)}, num_perturbations,
                           config=config, weight_decay=weight_decay, seed=seed, progress=progress)
        for measure in measures or MEASURES:
            top = store.topk("triggered", k=kmax, measure=measure, side="pos").indices["pos"]
            precision[f"Daunce {measure}"] = {k: float(np.mean([_precision_at(r, poisoned, k) for r in top])) for k in ks}
    if baselines:
        from daunce_store.evaluation import baselines as b

        for name, scores in (
            ("gradient cosine", b.grad_cosine_scores(model, data.x_train, data.y_train, xq, yq)),
            ("influence function (exact H)", b.influence_function_scores(model, data.x_train, data.y_train, xq, yq, weight_decay=weight_decay)),
        ):
            top = np.argsort(-scores, axis=0, kind="stable")[:kmax].T
            precision[name] = {k: float(np.mean([_precision_at(r, poisoned, k) for r in top])) for k in ks}
    return BackdoorResult(precision, len(poisoned) / len(data.y_train), len(poisoned), len(others), attack, clean_acc, num_perturbations)


def run_mislabel(
    *,
    num_perturbations: int = 32,
    fraction: float = 0.05,
    ks: Sequence[int] | None = None,
    weight_decay: float = 1e-3,
    config: Any = None,
    measures: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> MislabelResult:
    """Flip labels, train the target logistic regression on the noisy data, run Daunce and rank train
    examples by self-influence (``store.self_influence``) under each measure in ``measures`` (default:
    cov, whitened, nystrom), against ranking by the target model's loss. The cov ranking is reported as
    "Daunce self-influence", the others as "Daunce self-influence (<measure>)"."""
    import torch

    from daunce_store.evaluation._daunce import SELF_MEASURES, fill_store

    torch.set_num_threads(1)
    data, flipped = flip_labels(load_digits_split(seed=seed), fraction, seed)
    model = fit(make_model("logreg"), data.x_train, data.y_train, weight_decay=weight_decay)
    ks = tuple(ks or (len(flipped), 2 * len(flipped)))
    kmax = max(ks)
    rankings: dict[str, np.ndarray] = {}
    with _workdir(workdir) as tmp:
        path = Path(tmp) / "mislabel.zarr"
        _remove(path)
        store = fill_store(path, model, data.x_train, data.y_train, {}, num_perturbations, config=config,
                           weight_decay=weight_decay, seed=seed, progress=progress)
        for measure in measures or SELF_MEASURES:
            name = "Daunce self-influence" if measure == "cov" else f"Daunce self-influence ({measure})"
            rankings[name] = store.self_influence(k=kmax, side="pos", measure=measure).indices["pos"][0]
    rankings["target-model loss"] = np.argsort(-per_example_loss(model, data.x_train, data.y_train), kind="stable")[:kmax]
    precision = {m: {k: _precision_at(r, flipped, k) for k in ks} for m, r in rankings.items()}
    recall = {m: {k: float(np.isin(r[:k], flipped).sum() / len(flipped)) for k in ks} for m, r in rankings.items()}
    return MislabelResult(precision, recall, len(flipped) / len(data.y_train), len(flipped), num_perturbations)


def _remove(path: Path) -> None:
    if path.exists():
        import shutil

        shutil.rmtree(path)
