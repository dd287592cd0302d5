"""Leases: how N workers split K perturbation ids without a coordinator.

A lease is a chain of generation records ``leases/<id>/<generation>.json``, each created only if absent:
taking over an expired lease, renewing one and releasing one all create the next generation, so of two
workers racing for the same step exactly one wins. The newest generation is the current state.

A lease is stale once it expires, or at once when its holder ran on this host and its process is gone
(``lease_state``: the record names host, pid and process start time). Taking a stale lease over is the
same create-if-absent step as any other, so a dead holder never lets two workers in.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from daunce_store import _constants as C
from daunce_store.errors import AlreadyCommittedError, LeaseError
from daunce_store.store._records import (
    Lease,
    check_perturbation_id,
    default_worker_name,
    iso,
    lease_is_live,
    lease_state,
    process_start_time,
)
from daunce_store.store._shape import StoreShape

__all__ = ["LeasesMixin"]


class LeasesMixin(StoreShape):
    """The lease methods of :class:`~daunce_store.LossStore`."""

    def _leased_ids(self) -> set[str]:
        return {k.split("/")[2] for k in self._storage.list(C.LEASES_PREFIX + "/")}

    def _current_lease(self, pid: str) -> dict[str, Any] | None:
        keys = self._storage.list(f"{C.LEASES_PREFIX}/{pid}/")
        records = [r for r in (self._storage.get(k) for k in keys) if r is not None]
        return max(records, key=lambda r: r["generation"]) if records else None

    def _put_generation(self, lease: Lease | dict[str, Any]) -> bool:
        rec = lease.record() if isinstance(lease, Lease) else lease
        return self._storage.put_if_absent(f"{C.LEASES_PREFIX}/{rec['perturbation']}/{int(rec['generation']):08d}.json", rec)

    def _check_lease(self, pid: str, lease: Lease | None) -> None:
        current = self._current_lease(pid)
        if not lease_is_live(current, time.time()):
            return
        assert current is not None
        if lease is None or current["token"] != lease.token:
            raise LeaseError(
                f"perturbation {pid!r} is leased by worker {current['worker']!r} until "
                f"{iso(current['expires_at'])}; append another id, wait for the lease to expire, or release "
                "it by hand if that worker is dead (`daunce leases STORE --release ID`)"
            )

    def claim(self, perturbation: str | int, *, worker: str | None = None, ttl: float = C.DEFAULT_LEASE_SECONDS) -> Lease | None:
        """Lease a perturbation id for ``ttl`` seconds; None if it is committed or leased by a live worker.

        A lease that expired, or whose holder's process on this host is gone, is taken over: the new
        lease's ``taken_over`` is the record it replaced (with its ``state``).
        """
        self._require_writable()
        pid = check_perturbation_id(perturbation)
        current = self._current_lease(pid)
        if lease_is_live(current, time.time()):
            return None
        # Checked after reading the lease: a holder commits before it releases, so a released lease
        # seen above means its commit is visible here (checking first would race with that commit).
        if self.is_committed(pid):
            return None
        lease = Lease(
            perturbation=pid,
            generation=(current["generation"] + 1) if current else 0,
            worker=worker or default_worker_name(),
            token=uuid.uuid4().hex,
            expires_at=time.time() + ttl,
            # Who holds it, so that a worker on this host can see at once that the holder is gone.
            host=socket.gethostname(),
            pid=os.getpid(),
            started=process_start_time(),
            taken_over=None if current is None or current.get("released") else dict(current, state=lease_state(current, time.time())),
        )
        # Create-if-absent on the next generation: of two workers taking over one lease, one wins.
        return lease if self._put_generation(lease) else None

    def claim_next(self, candidates: Sequence[str | int], *, worker: str | None = None, ttl: float = C.DEFAULT_LEASE_SECONDS) -> Lease | None:
        """Lease the first of ``candidates`` that is neither committed nor leased; None when none is left."""
        committed = self._committed_ids()
        for pid in candidates:
            if str(pid) in committed:
                continue
            lease = self.claim(pid, worker=worker, ttl=ttl)
            if lease is not None:
                return lease
        return None

    def renew(self, lease: Lease, ttl: float = C.DEFAULT_LEASE_SECONDS) -> Lease:
        """Extend a lease (a heartbeat for long fine-tunes); LeaseError if it was lost."""
        current = self._current_lease(lease.perturbation)
        if current is None or current["token"] != lease.token:
            raise LeaseError(f"lease on {lease.perturbation!r} was taken over by another worker")
        renewed = dataclasses.replace(lease, generation=lease.generation + 1, expires_at=time.time() + ttl, taken_over=None)
        if not self._put_generation(renewed):
            raise LeaseError(f"lease on {lease.perturbation!r} was taken over by another worker")
        return renewed

    def release(self, lease: Lease) -> None:
        """Give a lease back early (its perturbation was committed, or the worker gives up)."""
        self._put_generation(dict(lease.record(), generation=lease.generation + 1, released=True, expires_at=0.0))

    def leases(self) -> list[dict[str, Any]]:
        """Live leases: unexpired, unreleased, of uncommitted ids, and not held by a gone process of this
        host (:meth:`stale_leases` lists those)."""
        return [rec for rec in self.lease_table() if rec["state"] == "live"]

    def stale_leases(self) -> list[dict[str, Any]]:
        """Leases of uncommitted ids that no live worker holds any more: ``expired``, or ``holder-gone``
        (its process on this host has exited). Any worker takes these over at its next claim."""
        return [rec for rec in self.lease_table() if rec["state"] in ("expired", "holder-gone")]

    def lease_table(self) -> list[dict[str, Any]]:
        """The current lease record of every uncommitted id that has one, in id order, each with its
        ``state``: ``live``, ``expired``, ``holder-gone`` or ``released``.

        Examples
        --------
        >>> [(r["perturbation"], r["worker"], r["state"]) for r in store.lease_table()]  # doctest: +SKIP
        [('000003', 'node1:4242', 'holder-gone'), ('000004', 'node2:77', 'live')]
        """
        committed = self._committed_ids()
        now = time.time()
        current = (self._current_lease(pid) for pid in sorted(self._leased_ids() - committed))
        return [dict(rec, state=lease_state(rec, now)) for rec in current if rec is not None]

    def force_release(self, perturbation: str | int) -> dict[str, Any]:
        """Release the lease on ``perturbation`` by hand (its worker is dead on another host, say), so that
        any worker may claim it at once. Returns the record it released, with the ``state`` it had.

        The release is the next generation, created only if absent, like any other lease step. A live
        holder loses the lease at its next renewal; if it still commits first, its column counts and the
        id is not committed twice. Raises AlreadyCommittedError for a committed id and LeaseError for an
        id without a lease or with a released one.
        """
        self._require_writable()
        pid = check_perturbation_id(perturbation)
        for _ in range(3):  # the holder may renew between our read and our write: read again
            if self.is_committed(pid):
                raise AlreadyCommittedError(f"perturbation {pid!r} is committed: no lease to release")
            current = self._current_lease(pid)
            if current is None:
                raise LeaseError(f"perturbation {pid!r} has no lease (`daunce leases STORE` lists them)")
            if current.get("released"):
                raise LeaseError(f"the lease on {pid!r} is already released; any worker may claim it")
            state = lease_state(current, time.time())
            released = dict(current, generation=int(current["generation"]) + 1, released=True, expires_at=0.0,
                            released_by=default_worker_name())
            if self._put_generation(released):
                return dict(current, state=state)
        raise LeaseError(f"the lease on {pid!r} kept changing while it was released (its holder renews it); try again")
