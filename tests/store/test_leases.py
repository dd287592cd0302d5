"""Stale leases: a lease whose holder ran on this host and whose process is gone (killed, a zombie, or its
pid reused by another process) is taken over at once, not after its time-to-live; two workers taking over
one dead lease get exactly one winner; a lease can be listed and released by hand."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from _support import Location, assert_consistent, column

from daunce_store import errors
from daunce_store.store._records import lease_holder_gone, lease_is_live, lease_state, process_start_time

N, M = 64, 4

# Claims the ids in argv[3] (JSON list) with a long lease, prints their records, then sleeps until killed.
HOLDER = """
import json, sys, time
import daunce_store
store = daunce_store.open(sys.argv[1], storage_options=json.loads(sys.argv[2]))
leases = [store.claim(pid, worker="holder", ttl=float(sys.argv[4])) for pid in json.loads(sys.argv[3])]
print(json.dumps([None if lease is None else lease.record() for lease in leases]), flush=True)
time.sleep(3600)
"""


def _init(location: Location):
    return location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16, capacity=64)


def _holder(location: Location, pids: list[str], ttl: float) -> tuple[subprocess.Popen, list[dict]]:
    """A real process holding leases on ``pids``; returns it (alive) and its lease records."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, location.url(), json.dumps(location.options), json.dumps(pids), str(ttl)],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    assert line, "the holder process died before it claimed its leases"
    records = json.loads(line)
    assert all(r is not None for r in records), records
    return proc, records


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(location: Location) -> None:
    store = _init(location)
    ttl = 300.0
    proc, (record,) = _holder(location, ["p3"], ttl)
    assert record["host"] == socket.gethostname() and record["pid"] == proc.pid and record["started"] is not None
    # While the holder lives its lease holds: no other worker may take or append it.
    assert store.claim("p3") is None
    assert [r["state"] for r in store.lease_table()] == ["live"] and store.stale_leases() == []
    with pytest.raises(errors.LeaseError, match="leased by worker 'holder'"):
        store.append("p3", column(3, N))
    _kill(proc)
    # Dead at once, with 300 s left on the clock: listed as stale, no longer live anywhere.
    assert store.leases() == []
    (stale,) = store.stale_leases()
    assert stale["token"] == record["token"] and stale["state"] == "holder-gone" and stale["expires_at"] > time.time() + ttl / 2
    lease = store.claim_next(["p3"], worker="rescuer", ttl=ttl)
    assert lease is not None and lease.generation == record["generation"] + 1 and lease.worker == "rescuer"
    assert lease.taken_over is not None and lease.taken_over["token"] == record["token"]
    assert lease.taken_over["state"] == "holder-gone"
    assert [r["worker"] for r in store.leases()] == ["rescuer"]  # the rescuer (alive: this process) holds it now
    store.append("p3", column(3, N), {"test": column(3, M, salt=1)}, lease=lease)
    assert assert_consistent(location.open(mode="r")) == [3]
    assert store.lease_table() == [] and store.claim("p3") is None  # committed: nothing to claim or list


def test_an_append_without_a_lease_is_not_blocked_by_a_dead_holder(location: Location) -> None:
    store = _init(location)
    proc, _ = _holder(location, ["p1"], 300.0)
    _kill(proc)
    store.append("p1", column(1, N))
    assert store.is_committed("p1")


def test_racing_takeovers_of_a_dead_lease_have_one_winner(location: Location) -> None:
    _init(location)
    pids = [f"p{k}" for k in range(6)]
    proc, records = _holder(location, pids, 300.0)
    _kill(proc)
    threads_per_id = 6
    for pid, record in zip(pids, records):
        handles = [location.open() for _ in range(threads_per_id)]
        barrier = threading.Barrier(threads_per_id)
        won: list[object] = [None] * threads_per_id

        def take(i: int) -> None:
            barrier.wait()
            won[i] = handles[i].claim(pid, worker=f"taker-{i}", ttl=300.0)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(threads_per_id)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        winners = [lease for lease in won if lease is not None]
        assert len(winners) == 1, (pid, won)
        (winner,) = winners
        assert winner.generation == record["generation"] + 1 and winner.taken_over["token"] == record["token"]
        current = handles[0].leases()
        assert [(r["perturbation"], r["token"]) for r in current if r["perturbation"] == pid] == [(pid, winner.token)]


def test_force_release(location: Location) -> None:
    store = _init(location)
    store.append("p0", column(0, N))
    lease = store.claim("p1", worker="w1", ttl=300.0)
    assert lease is not None
    was = store.force_release("p1")
    assert was["token"] == lease.token and was["state"] == "live"
    (row,) = store.lease_table()
    assert row["state"] == "released" and row["released_by"] and row["generation"] == lease.generation + 1
    with pytest.raises(errors.LeaseError, match="taken over"):
        store.renew(lease)  # the holder finds out at its next heartbeat
    other = store.claim("p1", worker="w2")
    assert other is not None and other.taken_over is None  # a released lease is free, not taken over
    with pytest.raises(errors.AlreadyCommittedError, match="committed"):
        store.force_release("p0")
    with pytest.raises(errors.LeaseError, match="has no lease"):
        store.force_release("p9")
    store.force_release("p1")
    with pytest.raises(errors.LeaseError, match="already released"):
        store.force_release("p1")


def test_holder_gone_checks() -> None:
    host, me = socket.gethostname(), os.getpid()
    started = process_start_time()
    assert started is not None and abs(started - time.time()) < 86400 * 365
    alive = {"host": host, "pid": me, "started": started, "expires_at": time.time() + 60}
    assert not lease_holder_gone(alive) and lease_is_live(alive, time.time()) and lease_state(alive, time.time()) == "live"
    # The pid exists but started at another time: it was reused, the holder is gone.
    assert lease_holder_gone(dict(alive, started=started - 100))
    # Another host's process cannot be checked, and records written before host/pid existed only expire.
    assert not lease_holder_gone(dict(alive, host=host + "-elsewhere", pid=2**22 + 12345))
    old = {"expires_at": time.time() + 60, "worker": "old"}
    assert not lease_holder_gone(old) and lease_state(old, time.time()) == "live"
    assert lease_state(dict(old, expires_at=time.time() - 1), time.time()) == "expired"
    assert lease_state(dict(alive, released=True), time.time()) == "released"
    assert not lease_holder_gone(dict(alive, pid=0)) and not lease_holder_gone(dict(alive, pid=-1))
    # An exited process: gone while it is a zombie (not yet reaped) and after.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rec = dict(alive, pid=child.pid, started=process_start_time(child.pid))
    assert not lease_holder_gone(rec)
    child.kill()
    deadline = time.time() + 30
    while not lease_holder_gone(rec) and time.time() < deadline:  # a zombie until wait() below
        time.sleep(0.05)
    assert lease_holder_gone(rec) and child.poll() is not None
    assert lease_holder_gone(rec) and lease_state(rec, time.time()) == "holder-gone"
