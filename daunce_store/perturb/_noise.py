"""The noise floor of the recorded losses: is a store's across-K spread signal, or evaluation noise?

Daunce reads small loss differences between perturbed models. Batching (which neighbours and how much
padding an example gets, hence which kernels and summation orders run) and bf16 rounding move a loss by
a little too (DESIGN §8). :func:`check_noise` evaluates θ0 twice, in the config's fixed batches and in a
shuffled order with another batch size (and in fp32 when the config says bf16), and compares each
example's noise std with the std of its row across the K committed columns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from daunce_store.errors import InvalidInputError
from daunce_store.perturb._config import PerturbConfig
from daunce_store.perturb._progress import Reporter
from daunce_store.perturb._runner import evaluate_signal
from daunce_store.perturb._task import Task
from daunce_store.store import StoreLike

__all__ = ["NoiseReport", "check_noise", "NOISE_RATIO_WARNING"]

# A median noise/signal ratio above this means a tenth of the typical across-K spread is evaluation
# noise: the variance it adds to scores is >= 1 % and grows for the examples with the smallest spread.
NOISE_RATIO_WARNING = 0.1
QUANTILES = (0.5, 0.9, 0.99, 1.0)


@dataclasses.dataclass
class NoiseReport:
    """Per train example: ``noise_std`` (evaluation noise of θ0's loss), ``across_k_std`` (std of the
    example's row over the store's K columns) and their ``ratio``; ``summary`` holds quantiles."""

    noise_std: np.ndarray
    across_k_std: np.ndarray
    ratio: np.ndarray
    num_columns: int
    sources: list[str]
    summary: dict[str, dict[str, float]]

    @property
    def noisy(self) -> bool:
        return bool(np.median(self.ratio) > NOISE_RATIO_WARNING)

    def message(self) -> str:
        median = float(np.median(self.ratio))
        if self.noisy:
            return (f"median noise/signal ratio {median:.3g} > {NOISE_RATIO_WARNING}: evaluation noise ({', '.join(self.sources)}) "
                    "is a large part of the across-K spread; evaluate in fp32, keep eval batches fixed, or fine-tune "
                    "longer / with a larger lr so the perturbations move the losses more")
        return f"median noise/signal ratio {median:.3g} <= {NOISE_RATIO_WARNING}: the across-K spread is well above the noise floor"

    def rows(self) -> list[dict[str, Any]]:
        return [{"quantity": name, **{f"q{int(q * 100)}": v[f"q{int(q * 100)}"] for q in QUANTILES}} for name, v in self.summary.items()]


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"q{int(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}


def check_noise(
    store: StoreLike,
    model: torch.nn.Module,
    task: Task,
    train_data: Any,
    config: PerturbConfig,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> NoiseReport:
    """Evaluate θ0 (``model``) on ``train_data`` twice under different batching, and in fp32 too when
    ``config.precision`` is bf16, and compare each example's noise std with its std across the store's K
    columns. ``batch_size``: the second batching's size (default: half the config's eval batch size, at
    least 1, in a shuffled order).

    Examples
    --------
    >>> report = check_noise(store, model, task, train, PerturbConfig.from_yaml("run.yaml"))  # doctest: +SKIP
    >>> report.noisy, report.summary["ratio"]["q50"]                                          # doctest: +SKIP
    """
    if len(train_data) != store.n_train:
        raise InvalidInputError(f"train_data has {len(train_data)} examples but the store has {store.n_train} train ids; "
                                "pass the training set the store was filled from, in its id order")
    losses = store.train_losses()
    if losses.shape[1] < 2:
        raise InvalidInputError(f"{store.url} has {losses.shape[1]} committed column(s); the across-K spread needs at least 2 "
                                "(run `daunce perturb` first)")
    second = max(1, config.eval_batch_size // 2) if batch_size is None else int(batch_size)
    if second < 1:
        raise InvalidInputError(f"batch_size must be >= 1, not {batch_size}")
    n = len(train_data)
    fixed = evaluate_signal(model, task, train_data, config, reporter, "θ0 fixed batches")
    # Another batching: a shuffled order (other neighbours, other padding widths) and another batch size.
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = np.empty(n, dtype=np.float32)
    shuffled[perm] = evaluate_signal(model, task, [train_data[int(i)] for i in perm],
                                     config.replace(eval_batch_size=second), reporter, "θ0 other batches")
    diffs = [fixed - shuffled]
    sources = [f"batching ({config.eval_batch_size} in order vs {second} shuffled)"]
    if config.precision == "bf16":
        diffs.append(fixed - evaluate_signal(model, task, train_data, config.replace(precision="fp32"), reporter, "θ0 fp32"))
        sources.append("bf16 vs fp32")
    # Two measurements with independent noise of std s differ with std s * sqrt(2).
    noise = np.sqrt(np.mean([d.astype(np.float64) ** 2 for d in diffs], axis=0) / 2.0)
    spread = np.nanstd(losses.astype(np.float64), axis=1, ddof=1)
    ratio = noise / np.maximum(spread, np.finfo(np.float32).tiny)
    summary = {"noise std": _quantiles(noise), "across-K std": _quantiles(spread), "ratio": _quantiles(ratio)}
    if not math.isfinite(float(np.median(ratio))):
        raise InvalidInputError("the noise ratio is not finite: some losses are NaN or infinite")
    return NoiseReport(noise.astype(np.float32), spread.astype(np.float32), ratio.astype(np.float32), int(losses.shape[1]),
                       sources, summary)


def check_noise_from_config(
    url: str,
    config: PerturbConfig,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    base_dir: str | None = None,
    reporter: Reporter | None = None,
) -> NoiseReport:
    """:func:`check_noise` for `daunce check-noise STORE --config run.yaml`: θ0 and the training set from the
    config's factory (the one the perturb run used)."""
    from daunce_store.perturb._workers import build_from_config
    from daunce_store.store import open_store

    if device:
        config = config.replace(device=device)
    store = open_store(url, storage_options=storage_options)
    model, task, train, _ = build_from_config(config, base_dir)
    model.to(torch.device(config.device))
    return check_noise(store, model, task, train, config, batch_size=batch_size, reporter=reporter)
