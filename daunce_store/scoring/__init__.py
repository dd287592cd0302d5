"""Scoring: the streaming top-k kernel and its backends, and the attribution results built on it."""

from __future__ import annotations

from daunce_store.scoring._attribution import Attribution, influence, self_influence, topk_store
from daunce_store.scoring._backend import available_backends, topk

__all__ = ["Attribution", "available_backends", "influence", "self_influence", "topk", "topk_store"]
