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
    with pytest.warns(ConvergenceWarning, match="Train longer"):
        commit = _run(tmp_path / "s.zarr", digits, max_steps=1, lr=1e-6)
    conv = commit.metadata["convergence"]
    assert conv["ratio"] > 0.99 and conv["ratio"] > CONVERGENCE_THRESHOLD
    assert conv["ratio"] == pytest.approx(conv["grad_norm_end"] / conv["grad_norm_start"])
    # One step of 64 examples: the probe is capped at a tenth of what the fine-tune trains on (its cost).
    assert conv["probe_size"] == math.ceil(PROBE_FRACTION * 64) < commit.metadata["subset_size"]


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
