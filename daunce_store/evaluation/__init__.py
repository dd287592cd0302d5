"""Accuracy you can check: the LDS harness, backdoor retrieval and mislabel detection on scikit-learn's
bundled data sets (digits; breast_cancer and wine for other data), with gradient, influence-function and
TRAK baselines on the same model.

Needs the ``train`` extra (torch); TRAK needs ``traker`` (the ``bench`` extra).
"""

from __future__ import annotations

from daunce_store.evaluation._daunce import MEASURES, SELF_MEASURES, column_groups, default_config, fill_store
from daunce_store.evaluation._digits import (
    DATASETS,
    ClassificationData,
    DigitsData,
    add_trigger,
    fit,
    load_digits_split,
    load_split,
    make_model,
    predict_logits,
)
from daunce_store.evaluation.lds import LDSBenchmark, LDSComparison, compare_methods, lds, make_lds_benchmark

__all__ = [
    "DATASETS",
    "MEASURES",
    "SELF_MEASURES",
    "ClassificationData",
    "DigitsData",
    "LDSBenchmark",
    "LDSComparison",
    "add_trigger",
    "column_groups",
    "compare_methods",
    "default_config",
    "fill_store",
    "fit",
    "lds",
    "load_digits_split",
    "load_split",
    "make_lds_benchmark",
    "make_model",
    "predict_logits",
]
