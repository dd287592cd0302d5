"""The LLM LDS's gradient baselines (evaluation/lora_gradients.py) on a tiny random Llama: LESS's train update
is the step torch's own AdamW takes, LoGra's Woodbury form equals the explicit damped-Fisher inverse, and the
scores are deterministic, shaped (queries × train) and finite."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from daunce_store.evaluation.lora_gradients import (  # noqa: E402
    adam_update,
    fresh_lora,
    less_adam_scores,
    logra_scores,
    lora_gradients,
    train_lora,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perturb"))
import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    model, task, train, queries = F.tiny_lm(n_train=12, n_query=3)
    return model, task, train, queries["test"]


def test_less_train_update_is_the_step_adamw_takes(lm):
    model, task, train, _ = lm
    peft_model = fresh_lora(model, r=2, seed=0)
    lr = 1e-2
    optimizers = []
    train_lora(peft_model, task, train, epochs=2, lr=lr, batch_size=4, seed=0, after_epoch=optimizers.append)
    opt = optimizers[-1]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    batch = {k: v for k, v in task.collate([train[5]]).items()}
    grads = torch.autograd.grad(task.per_example_loss(task.outputs(peft_model, batch), batch).sum(), params)
    predicted = [adam_update(opt, p, g) for p, g in zip(params, grads)]

    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()  # AdamW with weight_decay=0: p ← p − lr · m̂/(√v̂ + ε)
    for p, b, d in zip(params, before, predicted):
        torch.testing.assert_close((b - p.detach()) / lr, d, rtol=1e-4, atol=1e-6)


def test_logra_woodbury_equals_the_explicit_damped_fisher_inverse(lm):
    model, task, train, queries = lm
    got = logra_scores(model, task, train, queries, r=2, seed=3, damping=0.1)
    peft_model = fresh_lora(model, r=2, seed=3)
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    gt = lora_gradients(peft_model, params, task, train, normalize=False).astype(np.float64)
    gq = lora_gradients(peft_model, params, task, queries, normalize=False).astype(np.float64)
    n, d = gt.shape
    assert d > n  # the case Woodbury is for
    lam = 0.1 * np.trace(gt @ gt.T) / n / n
    want = gq @ np.linalg.solve(gt.T @ gt / n + lam * np.eye(d), gt.T)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


def test_less_scores_are_deterministic_and_leave_the_model_alone(lm):
    model, task, train, queries = lm
    weights = copy.deepcopy(model.state_dict())
    a = less_adam_scores(model, task, train, queries, epochs=2, lr=1e-2, batch_size=4, r=2, seed=0)
    b = less_adam_scores(model, task, train, queries, epochs=2, lr=1e-2, batch_size=4, r=2, seed=0)
    assert a.shape == (len(queries), len(train)) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 2 * 1e-2 + 1e-9  # two checkpoints, each lr · a cosine
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
