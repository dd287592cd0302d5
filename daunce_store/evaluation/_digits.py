"""The evaluation testbeds: scikit-learn's bundled data sets (no network) and small torch classifiers.

``digits`` (1797 8 × 8 images, 10 classes) is the main one; ``breast_cancer`` (569 tumours, 30 measured
features, 2 classes), ``wine`` (178 wines, 13 features, 3 classes) and ``diabetes`` (442 patients, 10 clinical
features, the disease progression a year later binned into its tertiles: 3 ordered, heavily overlapping
classes, unlike the others' nearly separable ones) give the accuracy benchmark other data to check that a
choice made on digits carries over; ``chatterbot`` is real text (chatterbot-corpus lines as hashed word
features, labelled by topic), from the ``test`` extra. Everything here is deterministic given its seeds, so a
retrained model is a function of its training subset alone (logistic regression is convex and fitted to
convergence with full-batch L-BFGS).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store._optional import import_optional
from daunce_store.errors import InvalidInputError, MissingDependencyError

__all__ = [
    "DATASETS",
    "TEXT_CATEGORIES",
    "ClassificationData",
    "chatterbot_lines",
    "hashed_features",
    "load_chatterbot_topics",
    "DigitsData",
    "load_split",
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

#: The bundled data sets :func:`load_split` knows, with their default test-set size (20 % of the rows) and
#: the L2 penalty their target models are fitted with (``weight_decay`` of :func:`fit`).
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"n_test": 360, "weight_decay": 1e-3},
    "breast_cancer": {"n_test": 114, "weight_decay": 1e-2},
    "wine": {"n_test": 36, "weight_decay": 1e-2},
    "diabetes": {"n_test": 88, "weight_decay": 3e-2},  # 1e-2: IF LDS 0.21 (retrains land in different optima); 1e-1 underfits
    "chatterbot": {"n_test": None, "weight_decay": 1e-3},  # real text, not scikit-learn's: load_chatterbot_topics
}

#: chatterbot-corpus categories of the text testbed: the six with the most distinct lines (tech support's
#: 2100 lines hold ~20 distinct ones; trivia is capped at ``per_class``).
TEXT_CATEGORIES = ("ai", "coding", "conversations", "emotion", "psychology", "trivia")


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """A train/test split of one bundled data set (features as float32 rows, labels 0..C-1)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray  # row of each train example in the original data set
    test_index: np.ndarray
    dataset: str = "digits"

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def train_ids(self) -> list[str]:
        return [f"train-{i}" for i in range(len(self.y_train))]

    @property
    def test_ids(self) -> list[str]:
        return [f"test-{j}" for j in range(len(self.y_test))]

    def replace(self, **changes: Any) -> ClassificationData:
        return dataclasses.replace(self, **changes)


#: The digits split's name from before the other data sets (same class).
DigitsData = ClassificationData


def load_split(dataset: str = "digits", n_test: int | None = None, seed: int = 0) -> ClassificationData:
    """Load one of scikit-learn's bundled data sets (:data:`DATASETS`) and split off ``n_test`` test rows
    (default: 20 %) at random.

    Digits pixels are scaled to [0, 1]; the other sets' features are standardized with the train rows'
    mean and standard deviation (their raw scales differ by 10⁴, which no small model fits well).

    >>> d = load_split("breast_cancer")
    >>> d.x_train.shape, d.x_test.shape, d.num_classes
    ((455, 30), (114, 30), 2)
    """
    datasets = import_optional("sklearn.datasets", "train", "the evaluation datasets")

    if dataset not in DATASETS:
        raise InvalidInputError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if dataset == "chatterbot":
        return load_chatterbot_topics(n_test=n_test, seed=seed)
    bunch = getattr(datasets, f"load_{dataset}")()
    target = np.asarray(bunch.target)
    if dataset == "diabetes":  # a regression target: its tertiles as 3 ordered classes
        target = np.searchsorted(np.quantile(target, [1 / 3, 2 / 3]), target, side="right")
    n = len(target)
    n_test = DATASETS[dataset]["n_test"] if n_test is None else n_test
    if not 0 < n_test < n:
        raise InvalidInputError(f"n_test must be between 1 and {n - 1}, not {n_test}")
    order = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x = np.asarray(bunch.data, dtype=np.float64)
    if dataset == "digits":
        x = x / 16.0
    else:
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    x = x.astype(np.float32)
    y = np.asarray(target, dtype=np.int64)
    return ClassificationData(x[train], y[train], x[test], y[test], train, test, dataset)


def load_digits_split(n_test: int = 360, seed: int = 0) -> ClassificationData:
    """Load scikit-learn's bundled digits (1797 images) and split off ``n_test`` test images.

    >>> d = load_digits_split()
    >>> d.x_train.shape, d.x_test.shape
    ((1437, 64), (360, 64))
    """
    return load_split("digits", n_test, seed)


def add_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (rows of 64 pixels) with the backdoor patch set to full intensity."""
    out = np.array(x, dtype=np.float32, copy=True)
    for r, c in TRIGGER_PIXELS:
        out[..., 8 * r + c] = 1.0
    return out


def chatterbot_lines(categories: Sequence[str] = TEXT_CATEGORIES, *, per_class: int = 250,
                     rng: np.random.Generator | None = None) -> tuple[list[str], np.ndarray]:
    """(texts, labels): every distinct line (utterance or reply) of chatterbot-corpus's English conversations
    in ``categories``, labelled by its file's category, at most ``per_class`` lines each (drawn by ``rng``).
    Needs ``chatterbot-corpus`` (the ``test`` extra; no network)."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the text testbed needs chatterbot-corpus: pip install --no-deps chatterbot-corpus")
    folder = Path(spec.origin).parent / "data" / "english"
    rng = rng if rng is not None else np.random.default_rng(0)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(categories):
        path = folder / f"{name}.yml"
        if not path.is_file():
            raise InvalidInputError(f"chatterbot-corpus has no English category {name!r} ({path})")
        lines = dict.fromkeys(str(u).strip() for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
                              for u in conv if str(u).strip())
        chosen = list(lines)
        if len(chosen) > per_class:
            chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), per_class, replace=False))]
        texts += chosen
        labels += [label] * len(chosen)
    return texts, np.asarray(labels, dtype=np.int64)


def hashed_features(texts: Sequence[str], n_features: int = 256) -> np.ndarray:
    """Hashed word uni- and bigram features of ``texts`` (``HashingVectorizer``, l2-normalized), float32."""
    from sklearn.feature_extraction.text import HashingVectorizer

    x = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2").transform(list(texts))
    return np.asarray(x.todense(), dtype=np.float32)


def load_chatterbot_topics(
    categories: Sequence[str] = TEXT_CATEGORIES, *, per_class: int = 250, n_features: int = 256,
    n_test: int | None = None, seed: int = 0,
) -> ClassificationData:
    """Topic classification of real text: :func:`chatterbot_lines` as :func:`hashed_features`, split at
    random into train and test (``n_test`` rows, default 20 %). Needs ``chatterbot-corpus`` (the ``test`` extra; no network)."""
    rng = np.random.default_rng(seed)
    texts, y = chatterbot_lines(categories, per_class=per_class, rng=rng)
    x = hashed_features(texts, n_features)
    order = rng.permutation(len(y))
    n_test = int(round(0.2 * len(y))) if n_test is None else n_test
    if not 0 < n_test < len(y):
        raise InvalidInputError(f"n_test must be between 1 and {len(y) - 1}, not {n_test}")
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return ClassificationData(x[train], y[train], x[test], y[test], train, test, "chatterbot")


def make_model(kind: str = "logreg", *, hidden: int = 32, seed: int = 0, num_features: int = 64, num_classes: int = 10) -> Any:
    """A classifier for ``num_features`` inputs and ``num_classes`` classes (default: the digits'):
    ``logreg`` (features → classes; 650 parameters on digits), ``mlp`` (features → hidden, tanh →
    classes; 2410 parameters on digits) or ``mlp2`` (features → hidden, SiLU → hidden, SiLU → classes;
    1507 parameters on diabetes: deeper, with a non-saturating activation)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "logreg":
        model = nn.Linear(num_features, num_classes)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model
    if kind == "mlp":
        return nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
    if kind == "mlp2":
        return nn.Sequential(nn.Linear(num_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, num_classes))
    raise InvalidInputError(f"unknown model kind {kind!r}; use 'logreg', 'mlp' or 'mlp2'")


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
