"""bf16 autocast (the GPU setting) through the same code path: on CPU here, on CUDA when there is one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import daunce_store  # noqa: E402
from daunce_store.perturb import PerturbConfig, evaluate_signal, run_worker  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_lora_run_matches_fp32_closely(tmp_path: Path, device: str) -> None:
    torch.set_num_threads(1)
    model, task, train, queries = F.tiny_lm()
    columns = {}
    for precision in ("fp32", "bf16"):
        cfg = PerturbConfig(ratio=0.5, max_steps=3, batch_size=4, lr=3e-3, eval_batch_size=8, device=device,
                            precision=precision, lora={"r": 8, "dropout": 0.0})
        store = daunce_store.init(tmp_path / f"{precision}.zarr", [f"t{i}" for i in range(len(train))],
                                  {"test": [f"q{j}" for j in range(len(queries["test"]))]}, chunk_rows=64, capacity=64)
        commits = run_worker(store, model, task, train, queries, cfg, until=1, progress=False)
        assert commits[0].metadata["device"] == device and commits[0].metadata["config"]["precision"] == precision
        columns[precision] = store.train_losses()[:, 0]
    theta0 = evaluate_signal(model, task, train, PerturbConfig(device=device))
    # bf16 rounds (~3 significant digits) but fine-tunes the same way: the change from theta0 agrees.
    assert np.isfinite(columns["bf16"]).all()
    np.testing.assert_allclose(columns["bf16"], columns["fp32"], rtol=2e-2)
    assert np.corrcoef(columns["bf16"] - theta0, columns["fp32"] - theta0)[0, 1] > 0.8
