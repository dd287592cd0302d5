"""The runner trains perturbation k on PerturbationDraw's subset with its weights, records the draw in the
commit, and keeps the target's own L2 regularizer in the objective (task value, config override)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.perturb import (  # noqa: E402
    ClassificationTask,
    PerturbConfig,
    PerturbationDraw,
    batch_objective,
    draw_perturbation,
    l2_penalty,
    perturbation_draw,
    run_perturbation,
)

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

# One plain SGD step over all of D_k (one batch): theta1 = theta0 - lr * grad of the objective at theta0,
# which the test computes on its own from the draw and compares with the column the runner committed.
ONE_STEP = dict(objective="if", ratio=0.3, optimizer="sgd", lr=0.5, max_steps=1, batch_size=4096, scheduler="constant",
                warmup_ratio=0.0, eval_batch_size=4096, convergence_probe=0)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    model, _, train, queries = F.digits()
    return model, train, queries


def _store(path: Path, seed: int = 0) -> daunce_store.LossStore:
    tid, qid = F.digits_ids()
    return daunce_store.init(path, tid, {"test": qid}, seed=seed, chunk_rows=4096, capacity=8)


def _one_step_losses(model, task, train, draw: PerturbationDraw, c: np.ndarray, lr: float, weight_decay: float) -> np.ndarray:
    """Every train example's loss after one SGD step (no momentum yet) on D_k with weights c, from theta0."""
    subset = draw.subset(len(train))
    batch = (train.tensors[0][subset], train.tensors[1][subset])
    work = copy.deepcopy(model)
    params = list(work.parameters())
    obj = batch_objective(task, work, batch, torch.as_tensor(c[subset], dtype=torch.float32), draw.objective,
                          draw.gamma, lambda b: model(b[0]))
    grads = torch.autograd.grad(obj + l2_penalty(params, weight_decay), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
        return task.per_example_loss(work(train.tensors[0]), train.tensors).numpy()


def test_runner_trains_on_the_draws_subset_with_its_weights(tmp_path: Path, digits) -> None:
    model, train, queries = digits
    n = len(train)
    x, y = train.tensors
    indexed = torch.utils.data.TensorDataset(x, y, torch.arange(n))  # items carry their row, to see the batches

    class Recording(ClassificationTask):
        """A real classification task that notes which rows the fine-tune trains on."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def outputs(self, model, batch):
            if model.training and torch.is_grad_enabled():
                self.seen.append(batch[2].clone())
            return super().outputs(model, batch)

    task = Recording()
    cfg = PerturbConfig(**ONE_STEP)
    store = _store(tmp_path / "s.zarr", seed=7)
    commit = run_perturbation(store, 3, model, task, indexed, queries, cfg)
    draw = perturbation_draw(store.seed, 3, cfg)
    assert draw == PerturbationDraw(store.seed, 3, 0.3, "if", 1.0, 1.0)

    # The fine-tune's one batch is D_k, and D_k is the draw's Poisson subset (not a fixed-size one).
    assert len(task.seen) == 1
    assert np.array_equal(np.sort(task.seen[0].numpy()), draw.subset(n))
    assert commit.metadata["subset_size"] == len(draw.subset(n))
    # The step used the draw's weights c_ik: the committed column is theta0 - lr * grad with those c...
    column = store.train_losses()[:, 0]
    plain = ClassificationTask()
    np.testing.assert_allclose(column, _one_step_losses(model, plain, train, draw, draw.c(0, n), 0.5, 0.0), atol=2e-5)
    # ...and not with another perturbation's weights (the check is sensitive to them).
    other = PerturbationDraw(store.seed, 4, 0.3).c(0, n)
    assert np.abs(column - _one_step_losses(model, plain, train, draw, other, 0.5, 0.0)).max() > 1e-3

    # The public draw is the runner's.
    subset, xi, _ = draw_perturbation(store.seed, 3, n, 0.3)
    assert np.array_equal(subset, draw.subset(n)) and np.array_equal(xi, draw.xi(0, n))


def test_the_commit_records_a_draw_that_regenerates_the_weights_blockwise(tmp_path: Path, digits) -> None:
    model, train, queries = digits
    n = len(train)
    cfg = PerturbConfig(**{**ONE_STEP, "objective": "fisher", "rho": 0.8, "gamma": 0.5, "ratio": 0.4})
    store = _store(tmp_path / "s.zarr", seed=11)
    commit = run_perturbation(store, 5, model, ClassificationTask(), train, queries, cfg)
    draw = PerturbationDraw.from_metadata(commit.metadata)
    assert draw == PerturbationDraw(11, 5, 0.4, "fisher", 0.8, 0.5) == perturbation_draw(store.seed, 5, cfg)
    # Read back from the store's own record, not just the returned object.
    (stored,) = [c for c in store.commits() if c.perturbation == "000005"]
    assert PerturbationDraw.from_metadata(stored.metadata) == draw
    # Any row block's weights without the full vector: blocks of 97 rows concatenate to the whole.
    edges = list(range(0, n, 97)) + [n]
    blocks = list(zip(edges[:-1], edges[1:]))
    np.testing.assert_array_equal(np.concatenate([draw.c(a, b) for a, b in blocks]), draw.c(0, n))
    member = np.concatenate([draw.in_subset(a, b) for a, b in blocks])
    assert np.array_equal(np.flatnonzero(member), draw.subset(n))
    np.testing.assert_array_equal(np.concatenate([draw.xi(a, b) for a, b in blocks]), draw.xi(0, n))
    # The column is the one-step fine-tune with exactly these weights.
    np.testing.assert_allclose(store.train_losses()[:, 0],
                               _one_step_losses(model, ClassificationTask(), train, draw, draw.c(0, n), 0.5, 0.0), atol=2e-5)


def test_the_targets_weight_decay_enters_the_objective(tmp_path: Path, digits) -> None:
    """theta0 minimised mean loss + lambda/2 ||theta||^2: the perturbed objective keeps the term, so its
    gradient at theta0 moves by lambda * theta0; an explicit config value overrides the task's."""
    model, train, queries = digits
    n = len(train)
    lam = 0.05
    cases = [  # (task's lambda, config's lambda, lambda that must be used)
        (lam, None, lam),      # from the task
        (lam, 0.0, 0.0),       # the config switches it off
        (lam, 0.01, 0.01),     # the config overrides
        (None, None, 0.0),     # nobody says: 0, the old behaviour
    ]
    columns = []
    for j, (task_wd, cfg_wd, used) in enumerate(cases):
        task = ClassificationTask(weight_decay=task_wd)
        cfg = PerturbConfig(**{**ONE_STEP, "weight_decay": cfg_wd})
        store = _store(tmp_path / f"s{j}.zarr")
        commit = run_perturbation(store, 2, model, task, train, queries, cfg)
        assert commit.metadata["weight_decay"] == used
        assert commit.metadata["task"].get("weight_decay") == task_wd
        draw = PerturbationDraw.from_metadata(commit.metadata)
        column = store.train_losses()[:, 0]
        np.testing.assert_allclose(column, _one_step_losses(model, task, train, draw, draw.c(0, n), 0.5, used), atol=2e-5)
        columns.append(column)
    assert np.abs(columns[0] - columns[1]).max() > 1e-3  # lambda = 0.05 visibly changes the fine-tune
    np.testing.assert_array_equal(columns[1], columns[3])  # lambda = 0 either way

    # The term's gradient at theta0 is lambda * theta0 (what the one-step columns above rely on).
    params = list(model.parameters())
    (g_w, g_b) = torch.autograd.grad(l2_penalty(params, lam), params)
    torch.testing.assert_close(g_w, lam * model.weight.detach())
    torch.testing.assert_close(g_b, lam * model.bias.detach())
    assert l2_penalty(params, 0.0) == 0.0

    with pytest.raises(InvalidInputError, match="weight_decay"):
        ClassificationTask(weight_decay=-1.0)
    with pytest.raises(InvalidInputError, match="weight_decay"):
        PerturbConfig(weight_decay=-1.0)
    assert PerturbConfig().weight_decay is None
