"""Many processes on one store: leases hand out every perturbation exactly once, an expired lease of a
SIGKILLed worker is taken over, and two workers racing on one perturbation id commit it once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import _workers
from _support import Location, assert_consistent, column

pytestmark = pytest.mark.slow

N, M = 512, 8


def _init(location: Location):
    return location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=64, capacity=512)


def test_eight_workers_append_64_columns_exactly_once(location: Location) -> None:
    _init(location)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    candidates = [f"p{k}" for k in range(64)]
    procs = [ctx.Process(target=_workers.lease_worker, args=(location.url(), location.options, candidates, results)) for _ in range(8)]
    for p in procs:
        p.start()
    done = [results.get(timeout=300) for _ in procs]
    assert not [d for d in done if isinstance(d, str)], done  # a worker failed
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    flat = [pid for d in done for pid in d]
    assert sorted(flat) == sorted(candidates)  # each exactly once, none lost
    assert sum(1 for d in done if d) >= 2  # the work really was shared
    store = location.open(mode="r")
    assert assert_consistent(store) == list(range(64))
    assert store.leases() == []  # every lease was released on commit


def test_lease_of_killed_worker_is_taken_over_at_once(location: Location) -> None:
    """The holder ran on this host and its process is gone: its lease is stale before it expires."""
    store = _init(location)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    ttl = 60.0
    proc = ctx.Process(target=_workers.lease_and_hang, args=(location.url(), location.options, "p5", ttl, results))
    proc.start()
    record = results.get(timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert record is not None and record["perturbation"] == "p5"
    assert time.time() < record["expires_at"] and store.leases() == []
    assert [(r["token"], r["state"]) for r in store.stale_leases()] == [(record["token"], "holder-gone")]
    lease = store.claim_next(["p5"], worker="rescuer")
    assert lease is not None and lease.generation == record["generation"] + 1 and lease.worker == "rescuer"
    store.append("p5", column(5, N), {"test": column(5, M, salt=1)}, lease=lease)
    assert assert_consistent(location.open(mode="r")) == [5]


def test_two_workers_racing_on_one_id_commit_once(location: Location) -> None:
    _init(location)
    ctx = multiprocessing.get_context("spawn")
    results, barrier, rounds = ctx.Queue(), ctx.Barrier(2), 12
    procs = [ctx.Process(target=_workers.racing_worker, args=(location.url(), location.options, w, rounds, barrier, results)) for w in (0, 1)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = location.open(mode="r")
    commits = {c.perturbation: c for c in store.commits()}
    assert sorted(commits) == sorted(f"p{k}" for k in range(rounds))
    train = store.train_losses(slots=[commits[f"p{k}"].slot for k in range(rounds)])
    for k in range(rounds):
        winners = [w for w in (0, 1) if outcomes[w][k] == "won"]
        assert len(winners) == 1, (k, outcomes)
        assert commits[f"p{k}"].metadata["worker"] == winners[0]
        # The visible column is the winner's data, whole, never a mix of the two writers'.
        np.testing.assert_array_equal(train[:, k], column(k, N, salt=10 + winners[0]))


def test_compactors_alongside_appending_workers(location: Location) -> None:
    location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=64, capacity=512, pack_width=4)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    candidates = [f"p{k}" for k in range(40)]
    procs = [ctx.Process(target=_workers.lease_worker, args=(location.url(), location.options, candidates, results)) for _ in range(3)]
    procs += [ctx.Process(target=_workers.compact_worker, args=(location.url(), location.options, 40, results)) for _ in range(2)]
    for p in procs:
        p.start()
    done = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not [d for d in done if isinstance(d, str)], done
    groups = [g for d in done for g in d if isinstance(g, int)]  # compactors report group numbers
    assert len(groups) == len(set(groups))  # two compactors never wrote the same group
    store = location.open(mode="r")
    assert assert_consistent(store) == list(range(40))  # reads go through the packed groups
    packs = store._pack_map()
    assert len(packs) >= 36 and set(packs) <= set(store.snapshot().slots)
    np.testing.assert_array_equal(store.train_losses(), store._read_rows(store._train_losses, 0, N, list(store.snapshot().slots), use_packs=False))
