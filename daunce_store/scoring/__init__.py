"""Scoring: the streaming top-k kernel and its backends, the score measures, and the attribution results
built on them; :func:`scorer` keeps prepared train rows on a torch device for repeated queries;
:func:`topk_store`, :func:`influence` and :func:`self_influence` run in this process or, given ``client=``, on a
Dask cluster, with the same answers."""

from __future__ import annotations

from daunce_store.scoring._attribution import Attribution, Scores, envelope, influence, scores, self_influence, topk_losses, topk_store
from daunce_store.scoring._backend import available_backends, topk
from daunce_store.scoring._drift import drift_share
from daunce_store.scoring._numpy import ScoreUnderflowError, prepare_queries, prepare_rows
from daunce_store.scoring._measures import DEFAULT_MEASURE, MEASURE_HELP, MEASURE_NAMES, MEASURES, TOPK_MEASURE, Measure
from daunce_store.scoring._stability import Stability, stability
from daunce_store.scoring._scorer import StoreScorer, scorer
from daunce_store.scoring._torch import TorchScorer
from daunce_store.scoring._vocabulary import (BACKEND_CHOICES, BACKENDS, SIDE_CHOICES, SIDES, Backend, BackendChoice, Side, SideChoice,
                                               side_choice)

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "Backend",
    "BackendChoice",
    "DEFAULT_MEASURE",
    "SIDES",
    "SIDE_CHOICES",
    "Side",
    "SideChoice",
    "TOPK_MEASURE",
    "MEASURES",
    "MEASURE_HELP",
    "MEASURE_NAMES",
    "Attribution",
    "Measure",
    "ScoreUnderflowError",
    "Scores",
    "Stability",
    "StoreScorer",
    "TorchScorer",
    "available_backends",
    "drift_share",
    "envelope",
    "influence",
    "prepare_queries",
    "prepare_rows",
    "scorer",
    "scores",
    "self_influence",
    "side_choice",
    "stability",
    "topk",
    "topk_losses",
    "topk_store",
]
