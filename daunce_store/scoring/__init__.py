"""Scoring: the streaming top-k kernel and its backends, and the attribution results built on it."""

from __future__ import annotations

from daunce_store.scoring._attribution import Attribution, influence, self_influence, topk_store
from daunce_store.scoring._backend import available_backends, topk
from daunce_store.scoring._stability import Stability, stability

__all__ = ["Attribution", "Stability", "available_backends", "influence", "self_influence", "stability", "topk", "topk_store"]
