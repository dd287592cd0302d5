"""The convergence signal: each commit records the gradient norm of the perturbed objective on a probe of
D_k before and after the fine-tune, and an under-trained fine-tune raises a ConvergenceWarning."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.errors import ConvergenceWarning, InvalidInputError  # noqa: E402
from daunce_store.perturb import (  # noqa: E402
    CONVERGENCE_THRESHOLD,
    PROBE_FRACTION,
    ClassificationTask,
    PerturbConfig,
    run_perturbation,
)

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    model, _, train, queries = F.digits()
    return model, ClassificationTask(weight_decay=1e-3), train, queries  # theta0 was fitted with l2 = 1e-3


def _store(path: Path) -> daunce_store.LossStore:
    tid, qid = F.digits_ids()
    return daunce_store.init(path, tid, {"test": qid}, seed=0, chunk_rows=4096, capacity=8)


def _run(path: Path, digits, k: int = 0, **cfg):
    model, task, train, queries = digits
    return run_perturbation(_store(path), k, model, task, train, queries, PerturbConfig(eval_batch_size=2048, **cfg))


def test_an_under_trained_fine_tune_warns(tmp_path: Path, digits) -> None:
    # One epoch at a learning rate that moves nothing: the advice is relative to this run's own settings.
    with pytest.warns(ConvergenceWarning, match=r"Train longer \(epochs 1 -> 2\) or raise the learning rate "
                                                r"\(lr 1e-06 -> 3e-06\)") as caught:
        commit = _run(tmp_path / "s.zarr", digits, epochs=1, lr=1e-6, ratio=0.3)
    assert "3e-3" not in str(caught[0].message)  # not the small-model recipe for every run
    conv = commit.metadata["convergence"]
    assert conv["ratio"] > 0.99 and conv["ratio"] > CONVERGENCE_THRESHOLD
    assert conv["ratio"] == pytest.approx(conv["grad_norm_end"] / conv["grad_norm_start"])
    # One epoch of a few batches of 64: the probe is capped at a tenth of what the fine-tune trains on (its cost).
    steps = commit.metadata["steps"]
    assert conv["probe_size"] == math.ceil(PROBE_FRACTION * steps * 64) < commit.metadata["subset_size"]


def test_a_fixed_budget_fine_tune_records_but_does_not_warn(tmp_path: Path, digits) -> None:
    """Fewer steps than one pass over D_k (the LLM setting: a few LoRA steps) is not meant to reach the
    perturbed optimum: the ratio is recorded, and no advice to train to the optimum is given."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        commit = _run(tmp_path / "s.zarr", digits, max_steps=1, lr=1e-6)
    assert commit.metadata["convergence"]["ratio"] > 0.99  # far from the optimum, as a short run is
    assert commit.metadata["steps"] * 64 < commit.metadata["subset_size"]


def test_the_verdict_is_the_runs_median_said_once(tmp_path: Path) -> None:
    """The median ratio over the store's columns with the same settings decides, not one noisy column; the
    warning comes once, from the column that moves the median above the line. Real commits on a real store,
    with the records the runner writes (convergence ratio, config, steps, subset size)."""
    from daunce_store.perturb._runner import _warn_if_unconverged

    tid, qid = F.digits_ids()
    store = daunce_store.init(tmp_path / "s.zarr", tid[:20], {"test": qid[:4]}, seed=0, capacity=16)
    config, other = PerturbConfig(epochs=3, lr=1e-3), PerturbConfig(epochs=30, lr=1e-3)

    def commit(k: int, ratio: float, cfg: PerturbConfig) -> list[str]:
        c = store.append(f"{k:06d}", np.full(20, 1.0 + k, np.float32), {"test": np.ones(4, np.float32)}, metadata={
            "convergence": {"ratio": ratio}, "config": cfg.to_dict(), "steps": 30, "subset_size": 20})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _warn_if_unconverged(store, c, cfg)
        return [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]

    assert commit(0, 0.40, config) == [] and commit(1, 0.45, config) == []
    assert commit(2, 0.75, config) == []  # a tail column: the run's median is 0.45
    other_run = commit(3, 0.95, other)  # other settings are another run, judged on its own column
    assert len(other_run) == 1 and "median over 1 column with" in other_run[0], other_run
    assert commit(4, 0.90, config) == []  # median of 0.40, 0.45, 0.75, 0.90: 0.60
    said = commit(5, 0.92, config)  # median 0.75: over the line
    assert len(said) == 1 and "median over 5 columns with these settings" in said[0]
    assert "epochs 3 -> 6" in said[0] and "lr 0.001 -> 0.003" in said[0]
    assert commit(6, 0.97, config) == []  # said once


def test_a_well_trained_fine_tune_does_not_warn(tmp_path: Path, digits) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        # Full-batch Adam to the perturbed optimum of this convex objective (on a 30 % subset: its gradient
        # at theta0 is large against the float32 floor the end gradient reaches).
        commit = _run(tmp_path / "s.zarr", digits, ratio=0.3, batch_size=4096, epochs=500, lr=1e-2)
    conv = commit.metadata["convergence"]
    assert conv["grad_norm_start"] > 0 and conv["ratio"] < 0.05, conv


def test_the_defaults_pass_and_the_probe_leaves_the_column_alone(tmp_path: Path, digits) -> None:
    """The library defaults (adam, lr 3e-3, 20 epochs, batch 64) pass the check; the probe draws no random
    numbers and never touches the optimizer, so the column is the same with it, smaller, or without it."""
    columns = []
    for j, probe in enumerate((1024, 16, 0)):
        with warnings.catch_warnings():
            # The full probe must pass; a 16-example probe's gradient does not vanish at the optimum of all
            # of D_k, so its ratio says little (it may warn) — it is here only to show the column is the same.
            warnings.simplefilter("error" if probe == 1024 else "ignore", ConvergenceWarning)
            commit = _run(tmp_path / f"s{j}.zarr", digits, k=1, convergence_probe=probe)
        conv = commit.metadata["convergence"]
        if probe == 0:
            assert conv is None
        else:
            assert conv["probe_size"] == min(probe, commit.metadata["subset_size"])  # 20 epochs: no cost cap
        if probe == 1024:
            assert conv["ratio"] <= CONVERGENCE_THRESHOLD
        columns.append(daunce_store.open(tmp_path / f"s{j}.zarr").train_losses()[:, 0])
    np.testing.assert_array_equal(columns[0], columns[1])
    np.testing.assert_array_equal(columns[0], columns[2])
    with pytest.raises(InvalidInputError, match="convergence_probe"):
        PerturbConfig(convergence_probe=-1)
