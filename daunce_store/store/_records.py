"""The commit log's records: what a commit, a snapshot and a lease are, and the three ways records are
used — claimed by number, cached once read, and (leases) alive or not.

Every record is a small JSON object created with the storage's one atomic primitive, create-if-absent
(:meth:`Storage.put_if_absent`); commit records and pack manifests are never rewritten afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from daunce_store.errors import CorruptRecordError, InvalidInputError
from daunce_store.store._storage import Storage

__all__ = [
    "Commit",
    "Snapshot",
    "Lease",
    "ImmutableRecords",
    "check_perturbation_id",
    "check_query_set_name",
    "claim_numbered",
    "default_worker_name",
    "iso",
    "lease_is_live",
    "now_iso",
    "perturbation_id",
]

T = TypeVar("T")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def perturbation_id(k: int) -> str:
    """The id of perturbation k as the runner writes it: ``f"{k:06d}"`` (``000017``). Ids are strings:
    ``3`` and ``000003`` are different perturbations."""
    return f"{int(k):06d}"


def check_perturbation_id(pid: object) -> str:
    text = str(pid)
    if not text or set(text) - _NAME_CHARS or text.startswith("."):
        raise InvalidInputError(
            f"perturbation id {pid!r} must be non-empty and use only letters, digits, '_', '-', '.'"
        )
    return text


def check_query_set_name(name: str) -> str:
    if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
        raise InvalidInputError(
            f"query-set name {name!r} is not a plain identifier; use letters, digits and '_' "
            "(not starting with a digit), e.g. 'test' or 'backdoor_queries'"
        )
    return name


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()



@dataclasses.dataclass(frozen=True)
class Commit:
    """One committed perturbation column."""

    perturbation: str
    slot: int
    query_sets: tuple[str, ...]
    committed_at: str
    metadata: dict[str, Any]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Commit:
        return cls(
            perturbation=rec["perturbation"],
            slot=int(rec["slot"]),
            query_sets=tuple(rec.get("query_sets", ())),
            committed_at=rec.get("committed_at", ""),
            metadata=rec.get("metadata", {}),
        )


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent view: the committed columns at one moment, in slot order.

    ``query_slots[name]`` are the slots whose losses exist for that query set.
    """

    commits: tuple[Commit, ...]
    query_slots: Mapping[str, tuple[int, ...]]

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(c.slot for c in self.commits)

    @property
    def perturbations(self) -> tuple[str, ...]:
        return tuple(c.perturbation for c in self.commits)

    def __len__(self) -> int:
        return len(self.commits)


@dataclasses.dataclass
class Lease:
    """A worker's claim on a perturbation id; it expires unless renewed."""

    perturbation: str
    generation: int
    worker: str
    token: str
    expires_at: float

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


def commit_from_record(key: str, rec: dict[str, Any], url: str) -> Commit:
    try:
        return Commit.from_record(rec)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(
            f"commit record {key!r} of {url} lacks or garbles {e}; it was not written by daunce-store "
            "(restore it from a copy)"
        ) from None


def lease_is_live(record: dict[str, Any] | None, now: float) -> bool:
    """A lease record that still holds its perturbation: neither released nor expired at ``now``."""
    return record is not None and not record.get("released") and float(record["expires_at"]) >= now


def claim_numbered(storage: Storage, prefix: str, record: dict[str, Any], limit: int) -> int | None:
    """Create the next free record ``{prefix}/{i:08d}.json`` (i < ``limit``) with create-if-absent, starting
    after the highest one listed; returns i, or None when all are taken. Of racing claimants each gets a
    different number."""
    taken = storage.list(prefix)
    number = max((int(k.rsplit("/", 1)[1].split(".")[0]) for k in taken), default=-1) + 1
    while number < limit:
        if storage.put_if_absent(f"{prefix}/{number:08d}.json", record):
            return number
        number += 1
    return None


class ImmutableRecords(Generic[T]):
    """The records under a prefix that are created once and never rewritten (commits, pack manifests):
    each is fetched and parsed once per handle, so a refresh costs one listing plus the new records."""

    def __init__(self, storage: Storage, prefix: str, parse: Callable[[str, dict[str, Any]], T]):
        self._storage, self._prefix, self._parse = storage, prefix, parse
        self._seen: dict[str, T] = {}

    def refresh(self) -> dict[str, T]:
        """key -> parsed record, for every record listed now (in key order)."""
        keys = self._storage.list(self._prefix)
        new = [k for k in keys if k not in self._seen]
        for key, rec in zip(new, self._storage.get_many(new)):
            if rec is not None:
                self._seen[key] = self._parse(key, rec)
        return {k: self._seen[k] for k in keys if k in self._seen}
