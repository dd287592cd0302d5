"""The perturbation runner: Daunce fine-tunes of a torch / Hugging Face model, one loss column each.

Needs the ``train`` extra (torch, transformers, peft); ``import daunce_store`` alone never imports torch.

>>> from daunce_store.perturb import ClassificationTask, PerturbConfig, run_worker     # doctest: +SKIP
>>> run_worker(store, model, ClassificationTask(), train, {"test": test},
...            PerturbConfig(epochs=3, lr=1e-2), until=64)                           # doctest: +SKIP
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "daunce_store.perturb needs torch; install the training extra: pip install 'daunce-store[train]'"
    ) from e

from daunce_store.perturb._config import DEFAULT_LORA, PerturbConfig
from daunce_store.perturb._objective import batch_objective, perturbation_weights, perturbed_objective, reference_terms
from daunce_store.perturb._progress import NullReporter, QueueReporter, Reporter, RichReporter
from daunce_store.perturb._runner import (
    adapter_key,
    draw_perturbation,
    evaluate_signal,
    evaluate_stored,
    model_fingerprint,
    perturbation_id,
    run_perturbation,
    run_worker,
)
from daunce_store.perturb._workers import WorkerError, build_from_config, evaluate_query_sets, load_factory, run_workers
from daunce_store.perturb._task import CausalLMTask, ClassificationTask, Task, margin, sequence_loss

__all__ = [
    "DEFAULT_LORA",
    "CausalLMTask",
    "ClassificationTask",
    "NullReporter",
    "PerturbConfig",
    "QueueReporter",
    "Reporter",
    "RichReporter",
    "Task",
    "WorkerError",
    "build_from_config",
    "evaluate_query_sets",
    "load_factory",
    "run_workers",
    "adapter_key",
    "batch_objective",
    "draw_perturbation",
    "evaluate_signal",
    "evaluate_stored",
    "margin",
    "model_fingerprint",
    "perturbation_id",
    "perturbation_weights",
    "perturbed_objective",
    "reference_terms",
    "run_perturbation",
    "run_worker",
    "sequence_loss",
]
