"""Backdoor retrieval and mislabel detection: thresholds that random ranking cannot reach."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from daunce_store.evaluation import add_trigger, load_digits_split  # noqa: E402
from daunce_store.evaluation._digits import TRIGGER_PIXELS  # noqa: E402
from daunce_store.evaluation.poison import flip_labels, poison_with_trigger, run_backdoor, run_mislabel  # noqa: E402

pytestmark = pytest.mark.train


def test_poisoning_and_flipping_change_exactly_the_chosen_examples() -> None:
    data = load_digits_split()
    poisoned, idx = poison_with_trigger(data, fraction=0.03, target=0)
    assert len(idx) == round(0.03 * len(data.y_train))
    assert (data.y_train[idx] != 0).all() and (poisoned.y_train[idx] == 0).all()
    pix = [8 * r + c for r, c in TRIGGER_PIXELS]
    assert (poisoned.x_train[np.ix_(idx, pix)] == 1.0).all()
    rest = np.setdiff1d(np.arange(len(data.y_train)), idx)
    assert np.array_equal(poisoned.x_train[rest], data.x_train[rest]) and np.array_equal(poisoned.y_train[rest], data.y_train[rest])
    assert np.array_equal(add_trigger(data.x_train[:3])[:, pix], np.ones((3, len(pix))))

    noisy, flipped = flip_labels(data, fraction=0.05)
    assert (noisy.y_train[flipped] != data.y_train[flipped]).all()
    assert (noisy.y_train[rest[:0]] == data.y_train[rest[:0]]).all()
    same = np.setdiff1d(np.arange(len(data.y_train)), flipped)
    assert np.array_equal(noisy.y_train[same], data.y_train[same])


def test_triggered_queries_retrieve_the_poisoned_examples() -> None:
    r = run_backdoor(num_perturbations=16, ks=(10,), num_queries=30)
    assert r.attack_success > 0.5  # the backdoor is learned, so there is something to retrieve
    # Random ranking: precision@10 has mean 0.03 (poison rate) and its mean over 30 queries stays far below 0.3.
    assert r.random_precision < 0.04
    assert r.precision["Daunce corr"][10] >= 0.4
    # The normalised preconditioned forms are the retrieval measures of DESIGN §1.1.
    assert r.precision["Daunce nystrom-corr"][10] >= 0.4
    assert r.precision["Daunce whitened-corr"][10] >= 0.4


def test_self_influence_ranks_flipped_labels_first() -> None:
    r = run_mislabel(num_perturbations=16)
    k = r.num_flipped
    # Random ranking expects precision 0.05 at k = #flipped; P(>= 50% by chance) is astronomically small.
    assert r.random_precision < 0.06
    for name in ("Daunce self-influence", "Daunce self-influence (whitened)", "Daunce self-influence (nystrom)"):
        assert r.precision[name][k] >= 0.6, (name, r.precision[name])
        assert r.recall[name][2 * k] >= 0.8, (name, r.recall[name])
