"""Worker functions for the multi-process store tests (importable by ``spawn`` children)."""

from __future__ import annotations

import time
from typing import Any

from _support import column

import daunce_store
from daunce_store.errors import AlreadyCommittedError


def lease_worker(url: str, options: dict[str, Any] | None, candidates: list[str], results: Any) -> None:
    """Lease the next free perturbation, append its column, repeat until none is left."""
    try:
        store = daunce_store.open(url, storage_options=options)
        m = store.query_sets()["test"]
        done = []
        while (lease := store.claim_next(candidates, ttl=120)) is not None:
            k = int(lease.perturbation[1:])
            store.append(lease.perturbation, column(k, store.n_train), {"test": column(k, m, salt=1)}, lease=lease)
            done.append(lease.perturbation)
        results.put(done)
    except BaseException as e:  # report instead of leaving the parent waiting
        results.put(f"{type(e).__name__}: {e}")
        raise


def lease_and_hang(url: str, options: dict[str, Any] | None, pid: str, ttl: float, results: Any) -> None:
    """Take a lease and never finish: the parent kills this worker."""
    store = daunce_store.open(url, storage_options=options)
    lease = store.claim_next([pid], ttl=ttl)
    results.put(None if lease is None else lease.record())
    time.sleep(3600)


def racing_worker(url: str, options: dict[str, Any] | None, worker: int, rounds: int, barrier: Any, results: Any) -> None:
    """Append p0, p1, ... in lock-step with another worker (same ids, different data)."""
    store = daunce_store.open(url, storage_options=options)
    outcome = {}
    for k in range(rounds):
        barrier.wait()
        try:
            store.append(f"p{k}", column(k, store.n_train, salt=10 + worker), metadata={"worker": worker})
            outcome[k] = "won"
        except AlreadyCommittedError:
            outcome[k] = "lost"
    results.put((worker, outcome))


def compact_worker(url: str, options: dict[str, Any] | None, until: int, results: Any) -> None:
    """Compact over and over while others append, until ``until`` columns are committed."""
    try:
        store = daunce_store.open(url, storage_options=options)
        groups = []
        while True:
            done = store.num_columns() >= until
            groups += store.compact()
            if done:
                break
        results.put(groups)
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")
        raise
