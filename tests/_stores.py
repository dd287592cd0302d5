"""Small real stores for tests (imported by tests/conftest.py and by tests that build their own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import daunce_store


def make_losses(n: int, m: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (n, K) train and (m, K) query loss matrices with some shared structure."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((4, k))
    train = (rng.standard_normal((n, 4)) @ latent + 0.5 * rng.standard_normal((n, k))).astype(np.float32)
    query = (rng.standard_normal((m, 4)) @ latent + 0.5 * rng.standard_normal((m, k))).astype(np.float32)
    return train, query


def build_store(path: Path | str, train: np.ndarray, query: np.ndarray, chunk_rows: int = 64, **kw) -> daunce_store.LossStore:
    n, k = train.shape
    store = daunce_store.init(
        path, [f"t{i}" for i in range(n)], {"test": [f"q{j}" for j in range(query.shape[0])]}, chunk_rows=chunk_rows, **kw
    )
    for c in range(k):
        store.append(f"p{c}", train[:, c], {"test": query[:, c]}, metadata={"seed": c})
    return store
