"""A user's model factory for `daunce check-removal` tests (loaded by file path from a YAML config):
digits, 1000 train examples, a query set of 40 test digits, θ0 an L2-regularized logistic regression
fitted to its optimum."""

from __future__ import annotations

import numpy as np
import torch

from daunce_store.evaluation import fit, load_split, make_model
from daunce_store.perturb import ClassificationTask

N_TRAIN, N_QUERY, L2 = 1000, 40, 1e-3


def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_split("digits")
    return d.x_train[:N_TRAIN], d.y_train[:N_TRAIN], d.x_test[:N_QUERY], d.y_test[:N_QUERY]


def ids() -> tuple[list[str], list[str]]:
    return [f"train-{i}" for i in range(N_TRAIN)], [f"test-{j}" for j in range(N_QUERY)]


def digits(query_set: str = "test"):
    torch.set_num_threads(1)
    xtr, ytr, xq, yq = arrays()
    model = fit(make_model("logreg"), xtr, ytr, weight_decay=L2)
    train = torch.utils.data.TensorDataset(torch.as_tensor(xtr), torch.as_tensor(ytr))
    test = torch.utils.data.TensorDataset(torch.as_tensor(xq), torch.as_tensor(yq))
    return model, ClassificationTask(weight_decay=L2), train, {query_set: test}
