"""check-noise: θ0's evaluation noise (batching, bf16) against each example's spread across the K columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import daunce_store  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.perturb import PerturbConfig, check_noise, evaluate_signal, run_worker  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train
HERE = Path(__file__).resolve().parent

CONFIG = dict(objective="if", ratio=1.0, max_steps=3, batch_size=8, lr=1e-2, eval_batch_size=8,
              lora={"r": 4, "alpha": 8, "dropout": 0.0}, convergence_probe=0)


def _store(path: Path, n: int, m: int) -> daunce_store.LossStore:
    return daunce_store.init(path, [f"t{i}" for i in range(n)], {"test": [f"q{j}" for j in range(m)]}, capacity=8)


def test_real_perturbations_stand_far_above_the_fp32_noise_floor(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, task, train, queries = F.tiny_lm()
    cfg = PerturbConfig(**CONFIG)
    store = _store(tmp_path / "lm.zarr", len(train), len(queries["test"]))
    run_worker(store, model, task, train, queries, cfg, until=4, progress=False)
    report = check_noise(store, model, task, train, cfg)
    assert report.num_columns == 4 and report.noise_std.shape == (len(train),)
    assert not report.noisy and "well above the noise floor" in report.message()
    assert float(np.median(report.ratio)) < 0.01
    assert report.summary["across-K std"]["q50"] > 1e-4
    np.testing.assert_allclose(report.across_k_std, store.train_losses().std(axis=1, ddof=1), rtol=1e-5)
    # bf16 evaluation adds its rounding: a larger noise floor, and it is named.
    bf16 = check_noise(store, model, task, train, cfg.replace(precision="bf16"))
    assert bf16.sources[-1] == "bf16 vs fp32"
    assert np.median(bf16.noise_std) > 10 * np.median(report.noise_std)


def test_columns_that_barely_move_are_flagged(tmp_path: Path) -> None:
    """Columns whose spread is at the noise level (θ0's own losses plus 1e-8 jitter) must be reported noisy."""
    torch.set_num_threads(1)
    model, task, train, _ = F.tiny_lm(n_train=16)
    cfg = PerturbConfig(**CONFIG)
    theta0 = evaluate_signal(model, task, train, cfg)
    store = daunce_store.init(tmp_path / "flat.zarr", [f"t{i}" for i in range(16)], {}, capacity=4)
    rng = np.random.default_rng(0)
    for c in range(3):
        store.append(f"p{c}", (theta0 + 1e-8 * rng.standard_normal(16)).astype(np.float32), {})
    report = check_noise(store, model, task, train, cfg.replace(precision="bf16"))
    assert report.noisy and "warning" not in report.message() and "evaluation noise" in report.message()
    # Bad requests, one clear line each.
    with pytest.raises(InvalidInputError, match="16 train ids"):
        check_noise(store, model, task, train[:5], cfg)
    one = daunce_store.init(tmp_path / "one.zarr", [f"t{i}" for i in range(16)], {}, capacity=2)
    one.append("p0", theta0, {})
    with pytest.raises(InvalidInputError, match="at least 2"):
        check_noise(one, model, task, train, cfg)


def test_check_noise_cli(tmp_path: Path) -> None:
    import yaml

    torch.set_num_threads(1)
    model, task, train, queries = F.tiny_lm()
    cfg = PerturbConfig(**CONFIG, factory=f"{HERE / 'perturb_factories.py'}:tiny_lm")
    store = _store(tmp_path / "lm.zarr", len(train), len(queries["test"]))
    run_worker(store, model, task, train, queries, cfg, until=3, progress=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = subprocess.run([sys.executable, "-m", "daunce_store.cli", "check-noise", str(tmp_path / "lm.zarr"), "--config",
                          str(config), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "ratio" in text and "across-K std" in text and "well above the noise floor" in text
