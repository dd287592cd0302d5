"""The linear datamodeling score (LDS) on the evaluation testbeds, and the full method comparison.

LDS (Park et al., TRAK, 2023): draw S random subsets D_s (a fraction α of the training set), retrain the
target model on each, and measure each query's output f_j(D_s). An attribution method with scores
τ(i, j) predicts g_j(D_s) = Σ_{i ∈ D_s} τ(i, j); the LDS of query j is the Spearman correlation over s
between f_j and g_j, and the reported LDS is its mean over queries.

Sign convention (the whole package's): τ(i, j) > 0 means i is a *proponent* of j: training on i raises j's
margin and lowers its loss. So the measured output here is the query's **margin** (true logit minus
logsumexp of the others), and the prediction is +Σ τ. (Measuring the loss instead, the prediction is
−Σ τ; :func:`lds` takes ``output="loss"`` for that.) Daunce's measures (cov, whitened, Nyström and their
normalised forms) are positive for proponents because a train loss and a query loss that move together
across perturbations mean aligned gradients.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.evaluation._digits import (
    DATASETS,
    ClassificationData,
    fit,
    load_split,
    make_model,
    per_example_loss,
    per_example_margin,
    predict_logits,
)

__all__ = [
    "LDSBenchmark",
    "make_lds_benchmark",
    "lds",
    "LDSComparison",
    "compare_methods",
]


@dataclasses.dataclass(frozen=True)
class LDSBenchmark:
    """Fixed subsets and the outputs measured after retraining on them.

    ``masks[s, i]``: train example i is in subset s; ``outputs[s, j]``: query j's measured output
    (mean over ``seeds`` retrainings) under the model trained on subset s.
    """

    masks: np.ndarray
    outputs: np.ndarray
    output: str
    seeds: int

    @property
    def num_subsets(self) -> int:
        return int(self.masks.shape[0])


def make_lds_benchmark(
    data: ClassificationData,
    *,
    num_subsets: int = 100,
    fraction: float = 0.5,
    model_kind: str = "logreg",
    hidden: int = 32,
    weight_decay: float = 1e-3,
    seeds: int = 1,
    output: str = "margin",
    seed: int = 1234,
    progress: Callable[[int, int], None] | None = None,
) -> LDSBenchmark:
    """Retrain ``model_kind`` on ``num_subsets`` random subsets of ``fraction`` of the train set and measure
    every test query's ``output`` ("margin" or "loss"); ``seeds`` > 1 averages retrainings from different
    initializations (needed for non-convex models; logistic regression is convex and fitted to
    convergence, so one is exact)."""
    if num_subsets < 2:
        raise InvalidInputError(f"num_subsets must be >= 2 for a rank correlation, not {num_subsets}")
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must be in (0, 1), not {fraction}")
    if output not in ("margin", "loss"):
        raise InvalidInputError(f"output must be 'margin' or 'loss', not {output!r}")
    import torch

    n = len(data.y_train)
    rng = np.random.default_rng(seed)
    size = int(round(fraction * n))
    masks = np.zeros((num_subsets, n), dtype=bool)
    outputs = np.zeros((num_subsets, len(data.y_test)), dtype=np.float64)
    measure = per_example_margin if output == "margin" else per_example_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch fits: one thread is fastest and deterministic
    try:
        for s in range(num_subsets):
            masks[s, rng.choice(n, size=size, replace=False)] = True
            for r in range(seeds):
                model = fit(make_model(model_kind, hidden=hidden, seed=r, num_features=data.num_features, num_classes=data.num_classes),
                            data.x_train[masks[s]], data.y_train[masks[s]], weight_decay=weight_decay)
                outputs[s] += measure(model, data.x_test, data.y_test) / seeds
            if progress is not None:
                progress(s + 1, num_subsets)
    finally:
        torch.set_num_threads(threads)
    return LDSBenchmark(masks, outputs, output, seeds)


def _rank_columns(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def lds(scores: np.ndarray, bench: LDSBenchmark) -> np.ndarray:
    """Per-query LDS (Spearman over the subsets) of a (n_train, m) proponent score matrix; NaN for a query
    whose measured or predicted output does not vary. ``np.nanmean`` of it is the LDS."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (bench.masks.shape[1], bench.outputs.shape[1]):
        raise InvalidInputError(
            f"scores have shape {scores.shape}; the benchmark needs (n_train, m) = "
            f"{(bench.masks.shape[1], bench.outputs.shape[1])}"
        )
    predicted = bench.masks.astype(np.float64) @ scores  # (S, m): Σ_{i ∈ D_s} τ(i, j)
    measured = bench.outputs if bench.output == "margin" else -bench.outputs  # a loss falls when a proponent is in
    rp, rm = _rank_columns(predicted), _rank_columns(measured)
    rp -= rp.mean(axis=0)
    rm -= rm.mean(axis=0)
    denom = np.sqrt((rp * rp).sum(axis=0) * (rm * rm).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * rm).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


@dataclasses.dataclass
class LDSComparison:
    """Result of :func:`compare_methods`: one row per (method, K) with the mean LDS and its spread.

    Every row has the same keys: ``method``, ``K`` (None for methods without a budget), ``lds``, ``std``
    (over the column groups), ``groups``, ``seconds``, ``measure`` and ``config`` (Daunce rows: the score
    measure and the perturbation config's label) and ``lambda`` (TRAK rows: traker's ``lambda_reg``).
    """

    rows: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)

    def best(self, method: str) -> float:
        vals = [r["lds"] for r in self.rows if r["method"] == method]
        if not vals:
            raise InvalidInputError(f"no rows for method {method!r}")
        return max(vals)

    def daunce(self, measure: str, k: int, config: str = "") -> float:
        """The mean LDS of Daunce ``measure`` at ``k`` columns under the perturbation config ``config``."""
        for r in self.rows:
            if r["measure"] == measure and r["K"] == k and r["config"] == config:
                return float(r["lds"])
        raise InvalidInputError(f"no Daunce row for measure {measure!r}, K={k}, config {config!r}")


def compare_methods(
    *,
    dataset: str = "digits",
    model_kind: str = "logreg",
    hidden: int = 32,
    if_damping: float = 0.0,
    ks: Sequence[int] = (8, 16, 32, 64, 128),
    num_subsets: int = 100,
    weight_decay: float | None = None,
    measures: Sequence[str] | None = None,
    trak_models: int = 10,
    trak_proj_dim: int = 2048,
    trak_lambdas: Sequence[float] = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5),
    trak_sketch_models: Sequence[int] | None = None,
    daunce_config: Any = None,
    daunce_configs: dict[str, Any] | None = None,
    signal: str = "loss",
    max_groups: int = 8,
    workdir: str | Path | None = None,
    seed: int = 0,
    n_queries: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> LDSComparison:
    """Run the LDS comparison on one testbed: ``dataset`` (one of :data:`DATASETS`; default digits) with a
    ``model_kind`` classifier (logistic regression, or a tanh MLP with ``hidden`` units whose exact Hessian
    gets ``if_damping``·I added where it is not positive definite), fitted with ``weight_decay`` (default:
    the data set's).

    Compares, on the same model, queries and subsets: Daunce with each score measure in ``measures``
    (default: cov, corr, whitened, whitened-corr, nystrom, nystrom-corr) at each K in ``ks``, all from the
    same stored columns; gradient dot / cosine; the exact-Hessian influence function; TRAK (``traker``)
    with ``trak_proj_dim`` projections for every λ in ``trak_lambdas`` with M = 1 and M = ``trak_models``;
    TRAK with projection dimension K for each ensemble size in ``trak_sketch_models`` (default: 1 and
    ``trak_models``; ``()`` skips it) at its best λ for each K; and Daunce's analytic K → ∞ limits. ``daunce_configs`` maps a label to a
    perturbation config to compare several (default: ``{"": daunce_config}``). Daunce's K-curve averages
    ``max_groups`` disjoint groups of K columns from one store of max(ks) perturbations (the spread is
    reported as ``std``).
    """
    import torch

    from daunce_store.evaluation import baselines
    from daunce_store.evaluation._daunce import MEASURES, column_groups, fill_store

    measures = tuple(measures or MEASURES)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 for k in ks):
        raise InvalidInputError(f"every K must be a whole number >= 2 (Daunce needs two columns to score), not {list(ks)}")
    if not isinstance(num_subsets, (int, np.integer)) or num_subsets < 2:
        raise InvalidInputError(f"the LDS needs at least 2 retrained subsets, not {num_subsets!r}")
    data = load_split(dataset, seed=seed)  # refuses an unknown data set
    if weight_decay is None:
        weight_decay = DATASETS[dataset]["weight_decay"]
    if n_queries is not None:
        data = data.replace(x_test=data.x_test[:n_queries], y_test=data.y_test[:n_queries], test_index=data.test_index[:n_queries])
    xtr, ytr, xq, yq = data.x_train, data.y_train, data.x_test, data.y_test

    def new_model() -> Any:
        return make_model(model_kind, hidden=hidden, num_features=data.num_features, num_classes=data.num_classes)

    torch.set_num_threads(1)
    target = fit(new_model(), xtr, ytr, weight_decay=weight_decay)
    num_params = sum(p.numel() for p in target.parameters())
    acc = float((predict_logits(target, xq).argmax(1) == yq).mean())
    log(f"target: {model_kind} ({num_params} parameters) on {len(ytr)} {dataset} examples, weight decay {weight_decay}, "
        f"test accuracy {acc:.3f}")

    t = time.perf_counter()
    # Non-convex models are retrained from θ0's own initialization (seed 0), so a subset's outputs are
    # a deterministic function of the subset.
    bench = make_lds_benchmark(data, num_subsets=num_subsets, model_kind=model_kind, hidden=hidden, weight_decay=weight_decay,
                               seed=seed + 1234)
    log(f"LDS benchmark: {num_subsets} subsets of 50% retrained in {time.perf_counter() - t:.1f}s")
    rows: list[dict[str, Any]] = []

    def add(method: str, scores: np.ndarray, k: int | None = None, seconds: float | None = None, spread: Sequence[float] = (),
            measure: str | None = None, config: str | None = None, lam: float | None = None) -> float:
        per_query = lds(scores, bench)
        values = [float(np.nanmean(per_query))] + [float(v) for v in spread]
        mean = float(np.mean(values))
        row = {"method": method, "K": k, "lds": mean, "std": float(np.std(values)) if len(values) > 1 else None,
               "groups": len(values), "seconds": None if seconds is None else round(seconds, 2),
               "measure": measure, "config": config, "lambda": lam}
        rows.append(row)
        log(f"  {method:<36} K={'' if k is None else k!s:<5} LDS {row['lds']:.3f}" + (f" ± {row['std']:.3f} over {len(values)} groups" if row["std"] is not None else ""))
        return mean

    for name, fn in (
        ("gradient dot", lambda: baselines.grad_dot_scores(target, xtr, ytr, xq, yq)),
        ("gradient cosine", lambda: baselines.grad_cosine_scores(target, xtr, ytr, xq, yq)),
        ("influence function (exact H)", lambda: baselines.influence_function_scores(target, xtr, ytr, xq, yq, weight_decay=weight_decay, damping=if_damping)),
    ):
        t = time.perf_counter()
        scores = fn()
        add(name, scores, seconds=time.perf_counter() - t)

    # TRAK's ensemble: models trained on independent random halves of the training set (as in the TRAK
    # paper's subsampled ensembles; a convex model trained on all of D would give M identical copies).
    # traker's default lambda_reg = 0 inverts ΦᵀΦ undamped; the grid shows what tuning it buys (picked
    # on these same subsets, so the best row is optimistic for TRAK). One featurization serves every λ.
    rng = np.random.default_rng(seed + 99)
    t = time.perf_counter()
    members = []
    for _ in range(trak_models):
        half = rng.choice(len(ytr), size=len(ytr) // 2, replace=False)
        members.append(fit(new_model(), xtr[half], ytr[half], weight_decay=weight_decay))
    t_members = time.perf_counter() - t
    for m in (1, trak_models):
        tm = time.perf_counter()
        by_lambda = baselines.trak_scores_by_lambda(members if m > 1 else [target], xtr, ytr, xq, yq, proj_dim=trak_proj_dim,
                                                    lambdas=trak_lambdas)
        seconds = (time.perf_counter() - tm) / len(trak_lambdas) + (t_members if m > 1 else 0.0)
        for lam, scores in by_lambda.items():
            add(f"TRAK (traker, M={m}, λ={lam:g})", scores, seconds=seconds, lam=lam)
    # TRAK at the sketch size Daunce has: K projections of exact gradients, λ tuned per K the same way.
    # M = 1 is the equal-sketch comparison (K numbers per example, as Daunce's K losses); an ensemble of M
    # models holds M·K.
    sketch_models = tuple(sorted({1, trak_models})) if trak_sketch_models is None else tuple(trak_sketch_models)
    for m in sketch_models:
        ensemble = members[:m] if m > 1 else [target]
        for k in ks:
            tm = time.perf_counter()
            by_lambda = baselines.trak_scores_by_lambda(ensemble, xtr, ytr, xq, yq, proj_dim=k, lambdas=trak_lambdas)
            values = {lam: float(np.nanmean(lds(scores, bench))) for lam, scores in by_lambda.items()}
            best = max(values, key=values.__getitem__)
            add(f"TRAK proj=K (traker, M={len(ensemble)}, best λ)", by_lambda[best], k=k, lam=best,
                seconds=(time.perf_counter() - tm) / len(trak_lambdas) + (t_members if len(ensemble) > 1 else 0.0))

    # What plain cov estimates as K → ∞ when the perturbed fine-tunes reach their minimizers (DESIGN §1):
    # g_iᵀ H⁻¹ F H⁻¹ g_j (IF form) and g_iᵀ F⁻¹ g_j (Fisher form), F = mean g gᵀ, computed exactly here.
    # (Nyström targets the influence function itself, DESIGN §1.1: its limit is the IF row.)
    gt = baselines.per_example_grads(target, xtr, ytr)
    gq = baselines.per_example_grads(target, xq, yq)
    h = baselines.exact_hessian(target, xtr, ytr, weight_decay)
    h[np.diag_indices_from(h)] += if_damping
    fisher = gt.T @ gt / len(gt)
    a = np.linalg.solve(h, np.linalg.solve(h, fisher).T).T  # H⁻¹ F H⁻¹
    add("Daunce IF-form limit K→∞ (analytic)", gt @ a @ gq.T)
    add("Daunce Fisher-form limit K→∞ (analytic)", gt @ np.linalg.solve(fisher + weight_decay * np.eye(len(fisher)), gq.T))

    kmax = max(ks)
    configs = daunce_configs or {"": daunce_config}
    convergence: dict[str, float | None] = {}
    for label, config in configs.items():
        suffix = f" ({label})" if label else ""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(workdir or tmp) / f"lds-{dataset}-{model_kind}{label.replace(' ', '_').replace('=', '')}.zarr"
            if path.exists():
                import shutil

                shutil.rmtree(path)
            t = time.perf_counter()
            torch.set_num_threads(1)
            store = fill_store(path, target, xtr, ytr, {"test": (xq, yq)}, kmax, config=config, signal=signal,
                               weight_decay=weight_decay, progress=progress)
            seconds = time.perf_counter() - t
            # The runner's convergence signal: |∇ objective| at the end of each fine-tune over its value at θ0.
            ratios = [c.metadata["convergence"]["ratio"] for c in store.commits() if "ratio" in c.metadata.get("convergence", {})]
            convergence[label] = float(np.median(ratios)) if ratios else None
            log(f"Daunce{suffix}: {kmax} perturbations in {seconds:.1f}s"
                + (f", median convergence ratio {convergence[label]:.2f}" if ratios else ""))
            for measure in measures:
                for k in ks:
                    # Positions 0..K-1 among the store's columns; the K × K matrix of each group is cached
                    # on the store handle, so the many groups of one store cost one pass each.
                    first, *rest = column_groups(store, "test", k, max_groups=max_groups)
                    spread = [float(np.nanmean(lds(store.scores("test", measure=measure, columns=g).to_numpy(), bench))) for g in rest]
                    add(f"Daunce {measure}{suffix}", store.scores("test", measure=measure, columns=first).to_numpy(), k=k,
                        seconds=seconds * k / kmax, spread=spread, measure=measure, config=label)
    settings = {
        "dataset": dataset, "model_kind": model_kind, "hidden": hidden if model_kind != "logreg" else None, "num_params": num_params,
        "if_damping": if_damping, "n_train": len(ytr), "n_queries": len(yq), "num_subsets": num_subsets, "fraction": 0.5,
        "weight_decay": weight_decay, "output": "margin", "target_test_accuracy": acc, "signal": signal, "measures": list(measures),
        "daunce_configs": {label: (c.to_dict() if c is not None else None) for label, c in configs.items()},
        "daunce_convergence_median": convergence,
        "trak_models": trak_models, "trak_proj_dim": trak_proj_dim, "trak_lambdas": list(trak_lambdas), "trak_sketch_models": list(sketch_models),
    }
    return LDSComparison(rows, settings)
