"""The cached LLM path: θ0's lower layers once, the last L layers + norm + head (at target tokens only)
per perturbation. It must give the full model's per-example losses, with and without LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import daunce_store  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.perturb import (  # noqa: E402
    CachedCausalLMTask,
    LlamaTail,
    PerturbConfig,
    cache_hidden_states,
    cached_lm,
    evaluate_signal,
    run_perturbation,
)

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

N_LAYERS = 4


def _setup(n_train: int = 24):
    torch.set_num_threads(1)
    _, task, train, queries = F.tiny_lm(n_train=n_train)
    return F.tiny_llama(num_layers=N_LAYERS), task, train, queries


@pytest.mark.parametrize("num_layers", [1, 2, N_LAYERS])
def test_cached_tail_gives_the_full_models_losses(num_layers: int) -> None:
    model, task, train, queries = _setup()
    tail, ctask, ctrain, cqueries = cached_lm(model, task, train, queries, num_layers, batch_size=7)
    assert len(tail.layers) == num_layers and tail.layers[0] is model.model.layers[N_LAYERS - num_layers]
    # Different batchings on the two sides: the padding of a batch must not leak into any example.
    full = evaluate_signal(model, task, train, PerturbConfig(eval_batch_size=5))
    cached = evaluate_signal(tail, ctask, ctrain, PerturbConfig(eval_batch_size=8))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(evaluate_signal(tail, ctask, cqueries["test"], PerturbConfig()),
                               evaluate_signal(model, task, queries["test"], PerturbConfig()), rtol=1e-5, atol=1e-5)
    assert np.ptp(full) > 1e-3  # the examples really differ


def test_the_head_runs_at_target_positions_only() -> None:
    model, task, train, _ = _setup()
    tail, ctask, ctrain, _ = cached_lm(model, task, train, None, 2)
    batch = ctask.collate(ctrain[:6])
    logits = ctask.outputs(tail, batch)
    targets = [sum(1 for t in it["labels"][1:] if t != -100) for it in train[:6]]
    assert logits.shape == (6, max(targets), model.config.vocab_size)
    assert batch["hidden"].shape[1] > max(targets)  # the prompt positions were skipped
    assert [int((row != -100).sum()) for row in batch["targets"]] == targets


def _lora_config(layers, **kw) -> PerturbConfig:
    return PerturbConfig(objective="if", ratio=0.5, max_steps=3, batch_size=4, lr=3e-3, eval_batch_size=8,
                         lora={"r": 4, "alpha": 8, "dropout": 0.05, "layers": layers}, convergence_probe=0, **kw)


def test_lora_on_the_last_layers_same_column_cached_and_full(tmp_path: Path) -> None:
    """One LoRA perturbation (IF objective, dropout on) run on the full model with lora.layers 'last-2'
    and on the cached tail gives the same train and query columns: the adapters sit on the same two
    layers, start from the same draw and see the same inputs."""
    model, task, train, queries = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tail, ctask, ctrain, cqueries = cached_lm(model, task, train, queries, 2)
    ids = [f"t{i}" for i in range(len(train))], {"test": [f"q{j}" for j in range(len(queries["test"]))]}
    full_store = daunce_store.init(tmp_path / "full.zarr", *ids, seed=3, capacity=2)
    tail_store = daunce_store.init(tmp_path / "tail.zarr", *ids, seed=3, capacity=2)
    full = run_perturbation(full_store, 0, model, task, train, queries, _lora_config("last-2", keep_adapters=True))
    cached = run_perturbation(tail_store, 0, tail, ctask, ctrain, cqueries, _lora_config(None, keep_adapters=True))
    np.testing.assert_allclose(tail_store.train_losses(), full_store.train_losses(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tail_store.query_losses("test"), full_store.query_losses("test"), rtol=1e-4, atol=1e-5)
    theta0 = evaluate_signal(model, task, train, PerturbConfig())
    assert np.abs(full_store.train_losses()[:, 0] - theta0).max() > 1e-3  # the adapters did change the losses
    # The full model's adapters are on layers 2 and 3 only.
    from daunce_store.perturb._runner import _load_state

    keys = list(_load_state(full_store, full.perturbation))
    assert keys and all(".layers.2." in k or ".layers.3." in k for k in keys), keys
    assert len(_load_state(tail_store, cached.perturbation)) == len(keys)
    for k, v in model.state_dict().items():  # theta0 is untouched
        assert torch.equal(v, before[k]), k


def test_hidden_state_cache_on_disk_is_reused_and_keyed_to_the_lower_layers(tmp_path: Path) -> None:
    model, task, train, _ = _setup(n_train=10)
    first = cache_hidden_states(model, task, train, 2, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = cache_hidden_states(model, task, train, 2, cache_dir=tmp_path)
    assert all(torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["labels"], b["labels"]) for a, b in zip(first, again))
    # Changing an upper layer (what LoRA-merging the last L layers does) keeps the cache valid ...
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(0.1)
    cache_hidden_states(model, task, train, 2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # ... changing a lower layer, the number of layers or the items does not.
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)
    moved = cache_hidden_states(model, task, train, 2, cache_dir=tmp_path)
    assert not torch.allclose(moved[0]["hidden"], first[0]["hidden"])
    cache_hidden_states(model, task, train, 1, cache_dir=tmp_path)
    cache_hidden_states(model, task, train[:5], 1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    bf16 = cache_hidden_states(model, task, train, 2, dtype="bf16")
    assert bf16[0]["hidden"].dtype == torch.bfloat16


def test_bad_layer_settings_are_refused_in_one_line() -> None:
    model, task, train, _ = _setup(n_train=4)
    for bad in (0, N_LAYERS + 1, "2", True):
        with pytest.raises(InvalidInputError, match="num_layers must be a whole number from 1 to 4"):
            LlamaTail(model, bad)
    with pytest.raises(InvalidInputError, match="not a Llama-family causal LM"):
        LlamaTail(torch.nn.Linear(2, 2), 1)
    for bad in (0, "last-x", "first-2", 2.5):
        with pytest.raises(InvalidInputError, match="lora.layers must be null"):
            PerturbConfig(lora={"layers": bad})
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        cache_hidden_states(model, task, train, 1, dtype="fp16")
    with pytest.raises(InvalidInputError, match="'hidden' and 'labels'"):
        CachedCausalLMTask().collate([{"input_ids": [1, 2]}])


def test_lora_layers_beyond_the_model_are_refused(tmp_path: Path) -> None:
    model, task, train, queries = _setup(n_train=8)
    store = daunce_store.init(tmp_path / "s.zarr", [f"t{i}" for i in range(8)], {"test": [f"q{j}" for j in range(6)]})
    with pytest.raises(InvalidInputError, match="more than the model's 4 decoder layers"):
        run_perturbation(store, 0, model, task, train, queries, _lora_config("last-5"))
    assert not store.snapshot().commits  # nothing was written
