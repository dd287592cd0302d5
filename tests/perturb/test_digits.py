"""A torch classifier on scikit-learn's digits: perturbations land in the store, and the covariance
attribution agrees with retraining (leave-group-out)."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.perturb import PerturbConfig, PerturbationDraw, run_worker  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

K = 32
CFG = PerturbConfig(objective="if", ratio=0.3, epochs=3, lr=1e-2, batch_size=64, eval_batch_size=2048)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    model, task, train, queries = F.digits()
    tid, qid = F.digits_ids()
    store = daunce_store.init(tmp_path_factory.mktemp("digits") / "s.zarr", tid, {"test": qid}, chunk_rows=4096, capacity=128)
    before = F.train_logreg(*F.digits_arrays()[:2]).state_dict()
    commits = run_worker(store, model, task, train, queries, CFG, until=K, progress=False)
    return store, model, commits, before


def test_columns_are_appended_with_metadata(digits_run) -> None:
    store, model, commits, before = digits_run
    assert [c.perturbation for c in commits] == [f"{k:06d}" for k in range(K)]
    assert store.num_columns() == K
    L, Q = store.train_losses(), store.query_losses("test")
    assert L.shape == (F.N_TRAIN, K) and Q.shape == (597, K)
    assert np.isfinite(L).all() and np.isfinite(Q).all()
    # Each column is a different fine-tune: columns differ, and losses vary across perturbations.
    assert np.std(L, axis=1).mean() > 1e-3
    meta = commits[0].metadata
    assert meta["objective"] == "if" and meta["config"]["lr"] == CFG.lr
    assert meta["subset_size"] == len(PerturbationDraw(store.seed, 0, 0.3).subset(F.N_TRAIN))
    assert PerturbationDraw.from_metadata(meta) == PerturbationDraw(store.seed, 0, 0.3)
    assert meta["seed"] == [store.seed, 0]
    # theta0 itself is not modified by the runner (a copy is fine-tuned).
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name])


def test_worker_stops_when_k_is_committed(digits_run) -> None:
    store, model, _, _ = digits_run
    model_, task, train, queries = F.digits()
    assert run_worker(store, model_, task, train, queries, CFG, until=K, progress=False) == []
    assert store.num_columns() == K


def test_covariance_agrees_with_leave_group_out_retraining(digits_run) -> None:
    """Removing a query's top-40 proponents (by cov) and retraining from scratch raises its loss much
    more than removing 40 random examples; removing its top opponents lowers it."""
    store, model, _, _ = digits_run
    xtr, ytr, xte, yte = F.digits_arrays()
    L, Q = store.train_losses().astype(np.float64), store.query_losses("test").astype(np.float64)
    cov = (L - L.mean(1, keepdims=True)) @ (Q - Q.mean(1, keepdims=True)).T / (K - 1)
    xq, yq = torch.as_tensor(xte), torch.as_tensor(yte)
    base = torch.nn.functional.cross_entropy(model(xq), yq, reduction="none").detach().numpy()
    queries = np.argsort(-base)[:8]  # the hardest test examples: their loss depends most on the data
    rng = np.random.default_rng(1)

    def loss_without(removed: np.ndarray, j: int) -> float:
        keep = np.setdiff1d(np.arange(len(ytr)), removed)
        m = F.train_logreg(xtr[keep], ytr[keep])
        return torch.nn.functional.cross_entropy(m(xq[j : j + 1]), yq[j : j + 1]).item()

    d_top, d_rand, d_neg = [], [], []
    for j in queries:
        d_top.append(loss_without(np.argsort(-cov[:, j])[:40], j) - base[j])
        d_rand.append(loss_without(rng.choice(len(ytr), 40, replace=False), j) - base[j])
        d_neg.append(loss_without(np.argsort(cov[:, j])[:40], j) - base[j])
    assert np.mean(d_top) > np.mean(d_rand) + 0.2, (d_top, d_rand)
    assert np.mean(np.array(d_top) > np.array(d_rand)) >= 0.75
    assert np.mean(d_neg) < np.mean(d_rand), (d_neg, d_rand)
