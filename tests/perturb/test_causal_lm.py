"""Causal LMs: token-level loss masking, LoRA perturbations of a tiny random Llama, stored adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import daunce_store  # noqa: E402
from daunce_store.perturb import (  # noqa: E402
    PerturbConfig,
    batch_objective,
    evaluate_signal,
    fill_query_losses,
    perturbation_weights,
    run_worker,
    sequence_loss,
)

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train


def test_sequence_loss_against_a_hand_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100], [-100, -100, -100, -100, -100]])
    expected = []
    for b in range(3):
        terms = []
        for t in range(4):  # position t predicts token t + 1
            target = int(labels[b, t + 1])
            if target != -100:
                logp = logits[b, t] - torch.logsumexp(logits[b, t], 0)
                terms.append(-float(logp[target]))
        expected.append(sum(terms) / len(terms) if terms else 0.0)
    np.testing.assert_allclose(sequence_loss(logits, labels).numpy(), expected, rtol=1e-5)


def test_padding_and_prompt_do_not_leak_into_the_loss() -> None:
    """A sequence's loss is the same alone and padded in a batch with a longer one, and only its
    completion tokens count."""
    model, task, train, _ = F.tiny_lm()
    short, long_ = sorted(train[:6], key=lambda it: len(it["input_ids"]))[0], max(train, key=lambda it: len(it["input_ids"]))
    assert len(short["input_ids"]) < len(long_["input_ids"])
    with torch.no_grad():
        alone = task.per_example_loss(task.outputs(model, b := task.collate([short])), b)
        padded = task.per_example_loss(task.outputs(model, b := task.collate([short, long_])), b)
        assert b["attention_mask"][0].sum() == len(short["input_ids"]) and (b["labels"][0, len(short["input_ids"]):] == -100).all()
        torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)
        # By hand from the model's logits: mean over completion tokens of -log p(token | prefix).
        ids = torch.tensor([short["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        targets = [t for t in range(1, len(short["labels"])) if short["labels"][t] != -100]
        by_hand = -sum(float(logp[t - 1, short["input_ids"][t]]) for t in targets) / len(targets)
        assert alone.item() == pytest.approx(by_hand, rel=1e-5)
        assert len(targets) < len(short["input_ids"]) - 1  # the prompt really was masked


def test_lora_objective_gradient_at_theta0_with_adapters_disabled_as_reference() -> None:
    """One model copy: theta0's outputs come from the same model with its LoRA adapters disabled, and
    at the fresh adapters (theta = theta0) the gradient is the (gamma - c)-weighted loss gradient."""
    from peft import LoraConfig, get_peft_model

    model, task, train, _ = F.tiny_lm()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # B = 0 at init makes the LoRA gradient of A vanish; move B off zero too
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    batch = task.collate(train[:5])

    def reference(b):
        with peft_model.disable_adapter():
            return task.outputs(peft_model, b)

    c = torch.as_tensor(perturbation_weights(np.linspace(0.1, 0.9, 5), "if", 1.0), dtype=torch.float32)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    # Take theta0 := the current adapters by folding them into the reference: compare against the
    # reference pass of the adapted model itself.
    obj = batch_objective(task, peft_model, batch, c, "if", 1.0, lambda b: task.outputs(peft_model, b))
    grads = torch.autograd.grad(obj, params)
    per_example = task.per_example_loss(task.outputs(peft_model, batch), batch)
    expected = torch.autograd.grad(((1.0 - c) * per_example).mean(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    # The disabled-adapter reference really is the base model's output.
    with torch.no_grad():
        base = F.tiny_llama()
        torch.testing.assert_close(reference(batch), task.outputs(base, batch), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(task.outputs(peft_model, batch), task.outputs(base, batch))


def _lm_store(path: Path, n: int, m: int) -> daunce_store.LossStore:
    return daunce_store.init(path, [f"t{i}" for i in range(n)], {"test": [f"q{j}" for j in range(m)]}, chunk_rows=64, capacity=64)


LORA_CFG = PerturbConfig(
    objective="if", ratio=0.5, max_steps=4, batch_size=4, lr=3e-3, eval_batch_size=8, warmup_ratio=0.25,
    lora={"r": 8, "alpha": 16, "dropout": 0.05}, keep_adapters=True,
)


def test_lora_perturbations_land_in_the_store_and_adapters_serve_a_later_query_set(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, task, train, queries = F.tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = {n for n, _ in model.named_modules()}
    store = _lm_store(tmp_path / "lm.zarr", len(train), len(queries["test"]))
    commits = run_worker(store, model, task, train, queries, LORA_CFG, until=2, progress=False)
    assert [c.perturbation for c in commits] == ["000000", "000001"]
    L, Q = store.train_losses(), store.query_losses("test")
    assert L.shape == (len(train), 2) and np.isfinite(L).all() and np.isfinite(Q).all()
    theta0 = evaluate_signal(model, task, train, LORA_CFG)
    assert not np.allclose(L[:, 0], theta0, atol=1e-4) and not np.allclose(L[:, 0], L[:, 1], atol=1e-4)
    # theta0 is back as it was: no adapter modules left, same weights, same trainability.
    assert {n for n, _ in model.named_modules()} == names_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert commits[0].metadata["config"]["lora"]["r"] == 8 and commits[0].metadata["adapter"]
    # A query set added later (here: the same examples again) evaluated under the stored adapters gives
    # the same losses as the columns computed during the run.
    store.add_query_set("later", [f"l{j}" for j in range(len(queries["test"]))])
    filled = fill_query_losses(store, model, task, "later", queries["test"], LORA_CFG)
    assert filled == ["000000", "000001"]
    np.testing.assert_allclose(store.query_losses("later"), Q, rtol=1e-5, atol=1e-6)
    assert fill_query_losses(store, model, task, "later", queries["test"], LORA_CFG) == []  # nothing left to fill
