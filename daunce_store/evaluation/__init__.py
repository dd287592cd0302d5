"""Accuracy you can check: the LDS harness, backdoor retrieval and mislabel detection on scikit-learn's
bundled data sets (digits; breast_cancer and wine for other data), with gradient, influence-function and
TRAK baselines on the same model.

Needs the ``train`` extra (torch); TRAK needs ``traker`` (the ``bench`` extra).
"""

from __future__ import annotations

from daunce_store.evaluation._daunce import MEASURES
from daunce_store.evaluation._digits import (
    DATASETS,
    ClassificationData,
    DigitsData,
    add_trigger,
    fit,
    load_digits_split,
    load_split,
    make_model,
)
from daunce_store.evaluation.lds import LDSBenchmark, LDSComparison, compare_methods, lds, make_lds_benchmark

__all__ = [
    "DATASETS",
    "MEASURES",
    "ClassificationData",
    "DigitsData",
    "LDSBenchmark",
    "LDSComparison",
    "add_trigger",
    "compare_methods",
    "fit",
    "lds",
    "load_digits_split",
    "load_split",
    "make_lds_benchmark",
    "make_model",
]
