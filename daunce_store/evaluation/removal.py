"""Subset removal: do the scores hold when the examples they rank are taken out and the model is retrained?

Two checks, one idea (the paper's "most influential subset removal"): remove the top-N proponents (helpful)
or opponents (harmful) of a query set, retrain, and compare the change of the queries' loss with the change
after removing N random examples. Sign convention (the package's): a proponent lowers the query loss, so
removing helpful examples should *raise* it and removing harmful ones should *lower* it, each by more than
removing random ones does.

* :func:`check_removal` (``daunce check-removal``) runs it on the user's own model, from a perturbation
  config's factory. **Retraining** there means: fine-tune the factory's model θ0 on the kept examples with
  the config's fine-tune settings (optimizer, lr, schedule, warm-up, epochs or max_steps, batch size, LoRA,
  precision, device) and plain loss + the target's L2 term (the ``blackbox`` objective; no perturbation),
  seeded by the seed (batch order, LoRA initialization). The same fine-tune runs on *all* examples with the
  same seed, and each Δloss is against that control, so the fine-tune's own drift cancels. It is the practical
  definition for a model that a factory hands over already trained: θ0 is the starting point, and the removed
  examples count only as far as the fine-tune moves away from them; a convex model trained to convergence
  forgets them completely.
* :func:`subset_removal` (``daunce eval removal``, ``bench/removal.py``) runs it on the testbeds, where the
  model is a logistic regression refitted from zeros to its optimum by L-BFGS (exact retraining), with
  Daunce and the gradient-cosine, exact influence-function and TRAK baselines ranking the same queries.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store._api import RECIPE_MODULE
from daunce_store._select import REMOVE
from daunce_store.errors import InvalidInputError
from daunce_store.evaluation._digits import (
    DATASETS,
    ClassificationData,
    chatterbot_lines,
    hashed_features,
    load_chatterbot_topics,
    fit,
    load_split,
    make_model,
    per_example_loss,
    predict_logits,
)
from daunce_store.scoring import DEFAULT_MEASURE

__all__ = [
    "REMOVAL_METHODS",
    "RemovalCheck",
    "SubsetRemoval",
    "chatterbot_lines",
    "check_removal",
    "recipe_config",
    "hashed_features",
    "load_chatterbot_topics",
    "load_testbed",
    "subset_removal",
]

#: The rankings :func:`subset_removal` compares (TRAK only when ``traker`` is installed).
REMOVAL_METHODS = ("daunce", "grad-cosine", "influence-function", "trak")

#: chatterbot-corpus categories of the text testbed: the six with the most distinct lines (tech support's
#: 2100 lines hold ~20 distinct ones; trivia is capped at ``per_class``).


# --- the user's model: fine-tune θ0 on the kept examples -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RemovalCheck:
    """Result of :func:`check_removal`. Δ values are the change of the query set's mean loss against the
    fine-tune on all examples with the same seed; one per seed."""

    query_set: str
    remove: str
    k: int
    n_train: int
    removed_ids: tuple[str, ...]
    removed_scores: np.ndarray
    control_loss: np.ndarray  # (seeds,) mean query loss after fine-tuning on everything
    targeted_delta: np.ndarray  # (seeds,)
    random_delta: np.ndarray  # (seeds,)
    measure: str
    num_columns: int

    @property
    def expected_sign(self) -> int:
        return 1 if self.remove == "helpful" else -1

    @property
    def verdict(self) -> str:
        """``holds`` (the targeted change has the expected sign and goes beyond every random removal),
        ``weak`` (expected sign, beyond the random mean but not every random removal) or ``does not hold``."""
        # Flip the harmful case's sign so that "the expected way" is up for both.
        t, r = self.expected_sign * float(self.targeted_delta.mean()), self.expected_sign * self.random_delta
        if t > 0 and t > r.max():
            return "holds"
        if t > 0 and t > r.mean():
            return "weak"
        return "does not hold"

    def summary(self) -> str:
        """One verdict line."""
        t, r = self.targeted_delta, self.random_delta
        verb = "raise" if self.remove == "helpful" else "lower"
        why = {"holds": f"the scores hold on this data: removing the top {self.remove} examples moves the loss the expected way, "
                        "beyond every random removal",
               "weak": "weak: the expected direction, beyond the random mean but not beyond every random removal "
                       "(more seeds, a larger k, or more perturbations K)",
               "does not hold": f"the scores do not hold here: removing the top {self.remove} examples did not {verb} the "
                                "loss beyond random removals (too few perturbations K? a fine-tune that does not forget?)"}
        return (f"top-{self.k} {self.remove}: Δloss {t.mean():+.4g} ± {t.std():.2g}; random {self.k}: "
                f"{r.mean():+.4g} ± {r.std():.2g} (range {r.min():+.4g} .. {r.max():+.4g}) over {len(t)} seeds. "
                f"Verdict: {why[self.verdict]}")

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in range(len(self.targeted_delta)):
            out.append({"seed": s, "control_loss": float(self.control_loss[s]),
                        f"delta_top_{self.remove}": float(self.targeted_delta[s]), "delta_random": float(self.random_delta[s])})
        return out


def check_removal(
    store: Any, config: Any, query_set: str, *, k: int = 20, remove: str = "helpful", seeds: int = 3,
    measure: str = DEFAULT_MEASURE, base_dir: str | os.PathLike[str] | None = None, device: str | None = None,
    progress: bool = True,
) -> RemovalCheck:
    """Remove the top-``k`` ``helpful`` (or ``harmful``) train examples of ``query_set`` (ranked by
    ``store.influence``), fine-tune the config's factory model on the rest, and compare the query set's mean
    loss change with that of removing ``k`` random examples, over ``seeds`` seeds (see the module doc for
    what "fine-tune" means). ``config``: a :class:`~daunce_store.perturb.PerturbConfig` whose ``factory``
    returns ``(model, task, train_data, query_data)`` in the store's id order; for a store a recipe made,
    :func:`recipe_config` reads it from the commits. The store is checked (query set, k, enough columns)
    by ranking before the factory loads any model."""
    if remove not in REMOVE:
        raise InvalidInputError(f"remove must be 'helpful' or 'harmful', not {remove!r}")
    if not isinstance(seeds, (int, np.integer)) or isinstance(seeds, bool) or seeds < 1:
        raise InvalidInputError(f"seeds must be a whole number >= 1, not {seeds!r}")
    n = store.n_train
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k < n:
        raise InvalidInputError(f"k must be a whole number between 1 and {n - 1} (the store has {n} train examples), not {k!r}")
    # The store first (query set, columns, measure): a store that cannot rank fails before any model loads.
    side = REMOVE[remove]
    ranked = store.influence(query_set, k=k, measure=measure, side=side)
    removed = ranked.indices[side][0].astype(np.int64)

    from daunce_store.perturb import build_from_config, finetune_losses, resolve_weight_decay

    if device is not None:
        config = config.replace(device=device)
    _check_recipe_files(config, store.url)
    model, task, train, queries = build_from_config(config, base_dir)
    if len(train) != n:
        raise InvalidInputError(f"the factory's train_data has {len(train)} examples but the store has {n} train ids; "
                                "the factory must give the training set the store was built from, in its id order")
    if query_set not in queries:
        raise InvalidInputError(f"the factory returns query sets {sorted(queries)}, not {query_set!r}; check-removal "
                                "evaluates that set's loss, so the factory must return it")
    if len(queries[query_set]) != len(store.query_ids(query_set)):
        raise InvalidInputError(f"the factory's query set {query_set!r} has {len(queries[query_set])} examples, the store's "
                                f"{len(store.query_ids(query_set))}")
    weight_decay = resolve_weight_decay(config, task)
    everything = np.arange(n)
    targeted_keep = np.setdiff1d(everything, removed)
    control, targeted, rand = (np.empty(seeds) for _ in range(3))
    with _progress(progress, 3 * seeds, f"check-removal: {3 * seeds} fine-tunes") as advance:
        for s in range(seeds):
            random_removed = np.random.default_rng([s, 2]).choice(n, size=k, replace=False)
            losses = {}
            for name, keep in (("all", everything), ("targeted", targeted_keep), ("random", np.setdiff1d(everything, random_removed))):
                losses[name] = finetune_losses(model, task, train, keep, queries[query_set], config, s, weight_decay).mean()
                advance()
            control[s] = losses["all"]
            targeted[s] = losses["targeted"] - losses["all"]
            rand[s] = losses["random"] - losses["all"]
    return RemovalCheck(query_set, remove, int(k), n, tuple(str(i) for i in ranked.train_ids[removed]),
                        ranked.scores[side][0], control, targeted, rand, ranked.measure, ranked.num_columns)


def recipe_config(store: Any) -> Any:
    """The :class:`~daunce_store.perturb.PerturbConfig` of the recipe run (``daunce perturb --recipe``) that
    made ``store``, read from its commits (factory, factory_kwargs with the model and data files, training
    settings); InvalidInputError saying what to give instead when the store has no columns or no recipe
    made it."""
    from daunce_store.perturb import PerturbConfig

    if not store.commits():
        raise InvalidInputError(f"{store.url} has no committed perturbation columns yet; run `daunce perturb` first")
    recorded = store.recipe_config()
    if recorded is None:
        raise InvalidInputError(f"{store.url} was not made by a recipe (`daunce perturb --recipe`), so its commits do not "
                                "say how to rebuild the model; give --config with the run's YAML (its factory)")
    return PerturbConfig.from_dict(recorded)


def _check_recipe_files(config: Any, url: str) -> None:
    """A recipe's model and data files (absolute paths, as its commits record them) still exist."""
    if not str(config.factory or "").startswith(RECIPE_MODULE + ":"):
        return
    kwargs = config.factory_kwargs
    files = {"model": kwargs.get("model"), "train data": kwargs.get("train"),
             **{f"query set {name!r}'s data": path for name, path in (kwargs.get("queries") or {}).items()}}
    for what, path in files.items():
        if isinstance(path, str) and not Path(path).exists():
            raise InvalidInputError(f"the {what} {url} was made from, {path}, no longer exists; give --config with "
                                    "the recipe's settings and factory_kwargs naming its new place")


class _progress:
    """A rich progress bar (or nothing) advanced by the returned callable."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the testbeds ---------------------------------------------------------------------------------------------
#: The testbeds of :func:`subset_removal`, with the L2 penalty their logistic regressions are fitted with.
TESTBEDS = {"digits": DATASETS["digits"]["weight_decay"], "chatterbot": 1e-3}


def load_testbed(name: str, seed: int = 0) -> ClassificationData:
    if name == "chatterbot":
        return load_chatterbot_topics(seed=seed)
    if name == "digits":
        return load_split("digits", seed=seed)
    raise InvalidInputError(f"unknown testbed {name!r}; use one of {', '.join(TESTBEDS)}")


@dataclasses.dataclass(frozen=True)
class SubsetRemoval:
    """Result of :func:`subset_removal`: one row per (method, N), with Δloss and Δaccuracy of the query
    groups (mean and standard deviation over groups) and, for the rankings, the fraction of groups whose
    Δloss beats every random removal of the same size (``beats_random``)."""

    rows: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)

    def delta(self, method: str, n: int) -> np.ndarray:
        """Per-group Δloss of ``method`` (or ``random``: the per-group maximum over seeds) at N = ``n``."""
        for r in self.rows:
            if r["method"] == method and r["N"] == n:
                return np.asarray(r["per_group"])
        raise InvalidInputError(f"no row for method {method!r} at N={n}")


def _ranking(scores: np.ndarray) -> np.ndarray:
    """Rows by descending score, ties to the lower row (the kernel's order)."""
    return np.argsort(-scores, kind="stable")


def subset_removal(
    dataset: str = "digits",
    *,
    ns: Sequence[int] = (10, 20, 40, 80),
    num_perturbations: int = 64,
    methods: Sequence[str] = REMOVAL_METHODS,
    groups: int = 10,
    group_size: int = 5,
    random_seeds: int = 5,
    measure: str = DEFAULT_MEASURE,
    trak_models: int = 5,
    trak_proj_dim: int = 512,
    seed: int = 0,
    workdir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SubsetRemoval:
    """Remove the top-N proponents of each query group by each method, refit, and measure the group's loss
    and accuracy change against removing N random examples (``random_seeds`` draws per N).

    ``dataset``: ``digits`` or ``chatterbot`` (topic classification of chatterbot-corpus lines); the model is
    a logistic regression refitted from zeros by L-BFGS, so retraining is exact and deterministic. Query
    groups: ``groups`` disjoint random sets of ``group_size`` test examples the target classifies correctly.
    Daunce ranks with ``store.influence(queries=group, side="pos", measure=measure)`` on a store of
    ``num_perturbations`` runner columns (r = 1.0); the baselines by the group's mean gradient-cosine, exact
    influence-function or TRAK score (``trak_models`` models on random halves, ``trak_proj_dim``
    projections; skipped with a note when ``traker`` is missing).
    """
    import torch

    from daunce_store.evaluation import baselines
    from daunce_store.evaluation._daunce import default_config, fill_store

    ns = sorted({int(v) for v in ns})
    unknown = [m for m in methods if m not in REMOVAL_METHODS]
    if unknown:
        raise InvalidInputError(f"unknown method(s) {unknown}; use {', '.join(REMOVAL_METHODS)}")
    if dataset not in TESTBEDS:
        raise InvalidInputError(f"unknown testbed {dataset!r}; use one of {', '.join(TESTBEDS)}")
    if groups < 1 or group_size < 1 or random_seeds < 1:
        raise InvalidInputError("groups, group_size and random_seeds must each be >= 1")
    data = load_testbed(dataset, seed)
    n = len(data.y_train)
    if not ns or ns[0] < 1 or ns[-1] >= n:
        raise InvalidInputError(f"every N must be between 1 and {n - 1}, not {ns}")
    weight_decay = TESTBEDS[dataset]
    methods = list(methods)
    if "trak" in methods and importlib.util.find_spec("trak") is None:
        log("TRAK skipped: the traker package is not installed (pip install 'daunce-store[bench]')")
        methods.remove("trak")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch fits: one thread is fastest and deterministic
    try:
        xtr, ytr = data.x_train, data.y_train

        def refit(keep: np.ndarray) -> Any:
            return fit(make_model("logreg", num_features=data.num_features, num_classes=data.num_classes), xtr[keep], ytr[keep],
                       weight_decay=weight_decay)

        target = refit(np.arange(n))
        correct = np.flatnonzero(predict_logits(target, data.x_test).argmax(1) == data.y_test)
        if groups * group_size > len(correct):
            raise InvalidInputError(f"{groups} groups of {group_size} need {groups * group_size} correctly classified test "
                                    f"examples; {dataset} has {len(correct)}")
        picked = np.random.default_rng([seed, 3]).choice(correct, size=groups * group_size, replace=False)
        xq, yq = data.x_test[picked], data.y_test[picked]
        group_of = np.arange(groups * group_size).reshape(groups, group_size)
        base_loss = per_example_loss(target, xq, yq)
        log(f"{dataset}: logistic regression on {n} examples ({data.num_features} features, {data.num_classes} classes), "
            f"{groups} query groups of {group_size}")

        def effect(model: Any) -> tuple[np.ndarray, np.ndarray]:
            """Per-group Δ mean loss and Δ accuracy against the target."""
            loss = per_example_loss(model, xq, yq) - base_loss
            right = (predict_logits(model, xq).argmax(1) == yq).astype(np.float64) - 1.0
            return loss[group_of].mean(1), right[group_of].mean(1)

        rankings: dict[str, np.ndarray] = {}  # method -> (groups, max N) train rows, most helpful first
        seconds: dict[str, float] = {}
        for method in methods:
            t = time.perf_counter()
            if method == "daunce":
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(workdir or tmp) / f"removal-{dataset}.zarr"
                    if path.exists():
                        import shutil

                        shutil.rmtree(path)
                    store = fill_store(path, target, xtr, ytr, {"test": (xq, yq)}, num_perturbations,
                                       config=default_config(ratio=1.0), weight_decay=weight_decay, progress=progress)
                    qids = store.query_ids("test")
                    rankings[method] = np.stack([
                        store.influence("test", list(qids[g]), k=ns[-1], measure=measure, side="pos").indices["pos"][0]
                        for g in group_of])
            else:
                if method == "grad-cosine":
                    scores = baselines.grad_cosine_scores(target, xtr, ytr, xq, yq)
                elif method == "influence-function":
                    scores = baselines.influence_function_scores(target, xtr, ytr, xq, yq, weight_decay=weight_decay)
                else:
                    rng = np.random.default_rng([seed, 4])
                    members = [refit(rng.choice(n, n // 2, replace=False)) for _ in range(trak_models)]
                    scores = baselines.trak_scores(members, xtr, ytr, xq, yq, proj_dim=trak_proj_dim)
                rankings[method] = np.stack([_ranking(scores[:, g].mean(1))[: ns[-1]] for g in group_of])
            seconds[method] = time.perf_counter() - t
            log(f"  ranked by {method} in {seconds[method]:.1f}s")

        rows: list[dict[str, Any]] = []
        random_loss = np.empty((len(ns), random_seeds, groups))
        random_acc = np.empty((len(ns), random_seeds, groups))
        for a, size in enumerate(ns):
            for s in range(random_seeds):
                removed = np.random.default_rng([seed, 5, size, s]).choice(n, size=size, replace=False)
                random_loss[a, s], random_acc[a, s] = effect(refit(np.setdiff1d(np.arange(n), removed)))
            rows.append({"method": "random", "N": size, "delta_loss": float(random_loss[a].mean()),
                         "std": float(random_loss[a].mean(0).std()), "delta_acc": float(random_acc[a].mean()),
                         "beats_random": None, "per_group": random_loss[a].max(0).tolist()})
        for method in methods:
            for a, size in enumerate(ns):
                dl, da = np.empty(groups), np.empty(groups)
                for g in range(groups):
                    dl[g], da[g] = (v[g] for v in effect(refit(np.setdiff1d(np.arange(n), rankings[method][g, :size]))))
                rows.append({"method": method, "N": size, "delta_loss": float(dl.mean()), "std": float(dl.std()),
                             "delta_acc": float(da.mean()), "beats_random": float((dl > random_loss[a].max(0)).mean()),
                             "per_group": dl.tolist()})
                log(f"  {method:<20} N={size:<4} Δloss {dl.mean():+.4f} ± {dl.std():.4f}  Δacc {da.mean():+.3f}  "
                    f"beats every random removal in {(dl > random_loss[a].max(0)).mean():.0%} of groups "
                    f"(random Δloss {random_loss[a].mean():+.4f})")
    finally:
        torch.set_num_threads(threads)
    settings = {"dataset": dataset, "n_train": n, "num_features": data.num_features, "num_classes": data.num_classes,
                "weight_decay": weight_decay, "ns": ns, "num_perturbations": num_perturbations, "measure": measure,
                "groups": groups, "group_size": group_size, "random_seeds": random_seeds, "methods": methods,
                "trak_models": trak_models, "trak_proj_dim": trak_proj_dim, "ranking_seconds": seconds, "seed": seed}
    return SubsetRemoval(rows, settings)
