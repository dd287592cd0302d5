"""The perturbation runner: Daunce fine-tunes of a torch / Hugging Face model, one loss column each.

Needs the ``train`` extra (torch, transformers, peft); ``import daunce_store`` alone never imports torch.

>>> from daunce_store.perturb import ClassificationTask, PerturbConfig, run_worker     # doctest: +SKIP
>>> run_worker(store, model, ClassificationTask(), train, {"test": test},
...            PerturbConfig(epochs=3, lr=1e-2), until=64)                           # doctest: +SKIP
"""

from __future__ import annotations

from daunce_store._optional import import_optional

import_optional("torch", "train", "daunce_store.perturb")  # a clear error before anything else needs it

from daunce_store.perturb._config import CONVERGENCE_THRESHOLD, DEFAULT_LORA, PROBE_FRACTION, PerturbConfig
from daunce_store.perturb._objective import batch_objective, l2_penalty, perturbed_objective, reference_terms
from daunce_store.perturb._progress import (
    PROGRESS_SECONDS_ENV,
    NullReporter,
    QueueReporter,
    Reporter,
    RichReporter,
    current_reporter,
    reporting,
)
from daunce_store.perturb._theta0 import UNTRAINED_CLASSIFIER, UNTRAINED_LM
from daunce_store.perturb._fingerprint import model_fingerprint
from daunce_store.perturb._runner import (
    draw_perturbation,
    evaluate_signal,
    fill_query_losses,
    finetune_losses,
    perturbation_draw,
    resolve_weight_decay,
    run_perturbation,
)
from daunce_store.perturb._recipes import (
    RECIPES,
    causal_lm,
    classifier,
    load_config,
    prepare_recipe,
    read_examples,
)
from daunce_store.perturb._workers import WorkerError, build_from_config, fill_query_sets, load_factory, run_worker, run_workers
from daunce_store.perturb._cached import CachedCausalLMTask, LlamaTail, cache_hidden_states, cached_lm
from daunce_store.perturb._adapters import KeptModels, add_query_data, losses_under_states
from daunce_store.perturb._model_files import cache_root, local_copy
from daunce_store.perturb._noise import NOISE_RATIO_WARNING, NoiseReport, check_noise, check_noise_from_config
from daunce_store.perturb._task import CausalLMTask, ClassificationTask, SequenceClassificationTask, Task, margin, sequence_loss
from daunce_store.store import PerturbationDraw, perturbation_id, perturbation_weights

__all__ = [
    "CONVERGENCE_THRESHOLD",
    "DEFAULT_LORA",
    "NOISE_RATIO_WARNING",
    "PROBE_FRACTION",
    "PROGRESS_SECONDS_ENV",
    "UNTRAINED_CLASSIFIER",
    "UNTRAINED_LM",
    "current_reporter",
    "reporting",
    "RECIPES",
    "SequenceClassificationTask",
    "causal_lm",
    "classifier",
    "load_config",
    "prepare_recipe",
    "read_examples",
    "CachedCausalLMTask",
    "CausalLMTask",
    "ClassificationTask",
    "LlamaTail",
    "NoiseReport",
    "NullReporter",
    "PerturbConfig",
    "PerturbationDraw",
    "QueueReporter",
    "Reporter",
    "RichReporter",
    "Task",
    "WorkerError",
    "build_from_config",
    "fill_query_sets",
    "load_factory",
    "run_workers",
    "batch_objective",
    "KeptModels",
    "add_query_data",
    "cache_hidden_states",
    "cache_root",
    "local_copy",
    "losses_under_states",
    "cached_lm",
    "check_noise",
    "check_noise_from_config",
    "draw_perturbation",
    "evaluate_signal",
    "fill_query_losses",
    "finetune_losses",
    "l2_penalty",
    "margin",
    "model_fingerprint",
    "perturbation_draw",
    "perturbation_id",
    "perturbation_weights",
    "perturbed_objective",
    "reference_terms",
    "resolve_weight_decay",
    "run_perturbation",
    "run_worker",
    "sequence_loss",
]
