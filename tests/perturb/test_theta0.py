"""θ0 checked: the runner reads θ0's train losses from the reference outputs the fine-tune computes anyway and
warns once, in one line, when the model looks untrained for its data (a classifier near log C, a language
model near log V). Real tiny Hugging Face models, real stores."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import daunce_store  # noqa: E402
from daunce_store.errors import UntrainedModelWarning  # noqa: E402
from daunce_store.perturb import UNTRAINED_CLASSIFIER, PerturbConfig, SequenceClassificationTask, run_perturbation  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

N_TRAIN, N_TEST = 48, 8


def _items():
    """Two classes told apart by a marker token at the front (learnable by a 1-layer BERT in a few dozen steps)."""
    tok = F.tiny_tokenizer()
    marker = tok.token_to_id("<s>")
    items = []
    for j, text in enumerate(F.topic_texts(N_TRAIN + N_TEST, words=12)):
        ids = tok.encode(text).ids[:16]
        label = j % 2
        items.append({"input_ids": ([marker] if label else []) + ids, "label": label})
    return items[:N_TRAIN], items[N_TRAIN:]


def _bert(seed: int):
    """A 1-layer BERT classifier with random weights (its own seed per test: the check runs once per model and process)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(config).eval()


def _fit(model, task, train, steps: int = 80):
    """θ0 trained on its data: full-batch Adam on the mean cross-entropy."""
    batch = task.collate(train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        task.per_example_loss(task.outputs(model, batch), batch).mean().backward()
        opt.step()
    return model.eval()


def _perturb(path: Path, model, task, train, test, k: int = 0, **cfg):
    store = daunce_store.init(path, [f"t{i}" for i in range(len(train))], {"test": [f"q{j}" for j in range(len(test))]},
                              seed=0, capacity=4)
    config = PerturbConfig(**{"max_steps": 2, "batch_size": 8, "lr": 1e-3, **cfg})
    commit = run_perturbation(store, k, model, task, train, {"test": test}, config)
    return store, commit


def test_a_fresh_head_warns_once_in_one_line(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train, test = _items()
    task = SequenceClassificationTask(pad_token_id=0)
    model = _bert(seed=101)  # random weights: the head has never seen these labels
    with pytest.warns(UntrainedModelWarning) as caught:
        store, commit = _perturb(tmp_path / "s.zarr", model, task, train, test)
    said = [str(w.message) for w in caught if issubclass(w.category, UntrainedModelWarning)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "θ0 looks untrained for this data" in said[0] and "log C = 0.693 for 2 classes" in said[0]
    assert "fine-tune θ0 on this train data first" in said[0]
    rec = commit.metadata["theta0_check"]
    assert rec["untrained"] and rec["kind"] == "classifier" and rec["chance_loss"] == pytest.approx(math.log(2))
    assert rec["mean_loss"] >= UNTRAINED_CLASSIFIER * math.log(2) and rec["examples"] >= 8
    # The next perturbation of the same θ0 in this process says nothing more (and measures nothing more).
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedModelWarning)
        nxt = run_perturbation(store, 1, model, task, train, {"test": test}, PerturbConfig(max_steps=2, batch_size=8))
    assert nxt.metadata["theta0_check"] is None


def test_a_trained_classifier_does_not_warn(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train, test = _items()
    task = SequenceClassificationTask(pad_token_id=0)
    model = _fit(_bert(seed=102), task, train)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedModelWarning)
        _, commit = _perturb(tmp_path / "s.zarr", model, task, train, test)
    rec = commit.metadata["theta0_check"]
    assert rec["untrained"] is False and rec["mean_loss"] < 0.3 * math.log(2), rec


def test_the_black_box_objective_is_checked_too(tmp_path: Path) -> None:
    """Its objective computes no θ0 outputs: the check runs θ0 on its first batches itself."""
    torch.set_num_threads(1)
    train, test = _items()
    task = SequenceClassificationTask(pad_token_id=0)
    with pytest.warns(UntrainedModelWarning):
        _, commit = _perturb(tmp_path / "s.zarr", _bert(seed=103), task, train, test, objective="blackbox")
    assert commit.metadata["theta0_check"]["untrained"]


def test_a_random_language_model_warns(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    _, task, train, queries = F.tiny_lm()
    # Its own seed: the check runs once per model (weights) and process, and other tests use tiny_lm's model.
    model = F.tiny_llama(400, seed=23)
    with pytest.warns(UntrainedModelWarning, match="language model whose mean token cross-entropy") as caught:
        _, commit = _perturb(tmp_path / "s.zarr", model, task, train, queries["test"], lora={"r": 4, "target_modules": ["q_proj"]})
    rec = commit.metadata["theta0_check"]
    assert rec["kind"] == "lm" and rec["chance_loss"] == pytest.approx(math.log(400), rel=0.01), rec
    said = [str(w.message) for w in caught if issubclass(w.category, UntrainedModelWarning)]
    assert len(said) == 1 and "pass a pretrained or fine-tuned model" in said[0], said
