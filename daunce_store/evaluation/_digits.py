"""The evaluation testbed: scikit-learn's bundled digits (no network) and small torch classifiers.

Everything here is deterministic given its seeds, so a retrained model is a function of its training
subset alone (logistic regression is convex and fitted to convergence with full-batch L-BFGS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError

__all__ = [
    "DigitsData",
    "load_digits_split",
    "make_model",
    "fit",
    "predict_logits",
    "per_example_loss",
    "per_example_margin",
    "add_trigger",
]

#: Pixels of the backdoor trigger (row, col) on the 8 × 8 image: a 4-pixel bar at the top of the left
#: edge, which is (almost) blank in every clean digit, so the patch is a feature clean examples lack.
TRIGGER_PIXELS = ((0, 0), (1, 0), (2, 0), (3, 0))


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """A train/test split of the digits (8 × 8 images as 64 floats in [0, 1], labels 0..9)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray  # row of each train example in the original 1797
    test_index: np.ndarray

    @property
    def train_ids(self) -> list[str]:
        return [f"train-{i}" for i in range(len(self.y_train))]

    @property
    def test_ids(self) -> list[str]:
        return [f"test-{j}" for j in range(len(self.y_test))]

    def replace(self, **changes: Any) -> DigitsData:
        return dataclasses.replace(self, **changes)


def load_digits_split(n_test: int = 360, seed: int = 0) -> DigitsData:
    """Load scikit-learn's bundled digits (1797 images) and split off ``n_test`` test images.

    >>> d = load_digits_split()
    >>> d.x_train.shape, d.x_test.shape
    ((1437, 64), (360, 64))
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    if not 0 < n_test < n:
        raise InvalidInputError(f"n_test must be between 1 and {n - 1}, not {n_test}")
    order = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return DigitsData(x[train], y[train], x[test], y[test], train, test)


def add_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (rows of 64 pixels) with the backdoor patch set to full intensity."""
    out = np.array(x, dtype=np.float32, copy=True)
    for r, c in TRIGGER_PIXELS:
        out[..., 8 * r + c] = 1.0
    return out


def make_model(kind: str = "logreg", *, hidden: int = 32, seed: int = 0) -> Any:
    """A digits classifier: ``logreg`` (64 → 10, 650 parameters) or ``mlp`` (64 → hidden → 10)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "logreg":
        model = nn.Linear(64, 10)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    raise InvalidInputError(f"unknown model kind {kind!r}; use 'logreg' or 'mlp'")


def fit(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> Any:
    """Minimize mean cross-entropy + (weight_decay / 2)·‖θ‖² with full-batch L-BFGS, in place.

    Deterministic: the same model state and data give the same fitted model (what LDS needs, so that
    the measured outputs of a subset do not carry training noise).
    """
    import torch

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> Any:
        opt.zero_grad()
        loss = training_objective(model, xt, yt, weight_decay)
        loss.backward()
        return loss

    model.train()
    opt.step(closure)
    model.eval()
    return model


def training_objective(model: Any, x: Any, y: Any, weight_decay: float) -> Any:
    """mean_i ℓ_i(θ) + (weight_decay / 2)·‖θ‖²: the objective ``fit`` minimizes (and whose Hessian the
    influence-function baseline inverts)."""
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x), y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(torch.sum(p * p) for p in model.parameters())
    return loss


def predict_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).numpy()


def per_example_loss(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example, float64."""
    logits = predict_logits(model, x).astype(np.float64)
    return _logsumexp(logits) - logits[np.arange(len(y)), y]


def per_example_margin(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Margin of each example: its true-class logit minus the logsumexp of the other logits
    (TRAK's output function; higher = more confidently right)."""
    logits = predict_logits(model, x).astype(np.float64)
    rows = np.arange(len(y))
    correct = logits[rows, y].copy()
    logits[rows, y] = -np.inf
    return correct - _logsumexp(logits)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    mx = a.max(axis=1, keepdims=True)
    return (mx + np.log(np.exp(a - mx).sum(axis=1, keepdims=True)))[:, 0]
