"""The loss store: per-example loss columns of K perturbed models, one committed column at a time.

Layout (Zarr v3, see ``_constants``)::

    zarr.json                      root attrs: {"daunce_store": {format, format_version, seed, ...}}
    train/ids       (n,)           string
    train/losses    (n, capacity)  float32, chunks (chunk_rows, 1), crc32c-checksummed
    queries/<name>/ids, queries/<name>/losses   the same per query set
    _daunce/slots/<slot>.json      a claimed physical column (create-if-absent)
    _daunce/commits/<id>.json      a committed perturbation: its slot and metadata (create-if-absent)
    _daunce/leases/<id>/<gen>.json work claims; a newer generation supersedes an expired one
    train/packed    (n, capacity)  float32, chunks (2^16, pack_width): compacted copies of committed columns
    _daunce/pack-claims/<g>.json   a compactor owns packed group g (create-if-absent)
    _daunce/packs/<g>.json         group g is written: its slots, in order (create-if-absent, after the data)

Why it is crash- and concurrency-safe: every column is written into a slot that one writer claimed
atomically, chunks are one column wide so no two writers ever touch the same chunk, a committed slot is
never written again, and readers only look at slots named by commit records, which are created
atomically after the data is in place. Two writers of one perturbation race on the commit record and
only one wins. A killed writer leaves at most an unreferenced slot.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from daunce_store import _constants as C
from daunce_store.errors import (
    AlreadyCommittedError,
    CapacityError,
    CorruptChunkError,
    CorruptRecordError,
    InvalidInputError,
    LeaseError,
    NotADaunceStoreError,
    StoreExistsError,
    StoreVersionError,
    UnknownIdError,
    UnknownQuerySetError,
)
from daunce_store.store._inputs import validate_ids, validate_losses
from daunce_store.store._storage import Storage

__all__ = ["LossStore", "Commit", "Lease", "Snapshot", "init_store", "open_store"]

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _check_query_set_name(name: str) -> str:
    if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
        raise InvalidInputError(
            f"query-set name {name!r} is not a plain identifier; use letters, digits and '_' "
            "(not starting with a digit), e.g. 'test' or 'backdoor_queries'"
        )
    return name


def _check_perturbation_id(pid: object) -> str:
    text = str(pid)
    if not text or set(text) - _NAME_CHARS or text.startswith("."):
        raise InvalidInputError(
            f"perturbation id {pid!r} must be non-empty and use only letters, digits, '_', '-', '.'"
        )
    return text


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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


class LossStore:
    """A daunce loss store. Make one with :func:`daunce_store.init` or :func:`daunce_store.open`.

    Examples
    --------
    >>> import numpy as np, daunce_store, tempfile
    >>> path = tempfile.mkdtemp() + "/s.zarr"
    >>> store = daunce_store.init(path, train_ids=["a", "b", "c"], query_sets={"test": ["q"]})
    >>> for k in range(3):
    ...     _ = store.append(f"p{k}", np.random.rand(3), {"test": np.random.rand(1)})
    >>> store.num_columns()
    3
    """

    def __init__(self, storage: Storage, mode: Literal["r", "a"] = "a"):
        self._storage = storage
        self.mode = mode
        try:
            self._root = zarr.open_group(storage.zarr_store, mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError) as e:
            # No zarr.json, a Zarr array instead of a group, or metadata that does not parse.
            raise NotADaunceStoreError(
                f"{storage.url} is not a daunce store (no readable Zarr group there: {type(e).__name__}); "
                "create one with `daunce init` or daunce_store.init()"
            ) from e
        attrs = self._root.attrs.get(C.ROOT_ATTR)
        if not isinstance(attrs, dict) or attrs.get("format") != C.FORMAT_NAME:
            raise NotADaunceStoreError(
                f"{storage.url} is a Zarr group but not a daunce store (no {C.ROOT_ATTR!r} attribute); "
                "point at a store made by `daunce init`"
            )
        version = int(attrs.get("format_version", 0))
        if version > C.FORMAT_VERSION:
            raise StoreVersionError(
                f"{storage.url} has format version {version}, newer than this daunce-store reads "
                f"({C.FORMAT_VERSION}); upgrade with `pip install -U daunce-store`"
            )
        self._info = attrs
        try:
            self._train_losses = self._root[f"{C.TRAIN_GROUP}/{C.LOSSES_ARRAY}"]
            self._train_ids_arr = self._root[f"{C.TRAIN_GROUP}/{C.IDS_ARRAY}"]
        except KeyError as e:
            raise NotADaunceStoreError(f"{storage.url}: the train arrays are missing; the store is damaged") from e
        self._train_ids: np.ndarray | None = None
        self._train_index: dict[str, int] | None = None
        self._query_cache: dict[str, tuple[Any, np.ndarray, dict[str, int]]] = {}
        self._commit_cache: dict[str, Commit] = {}
        self._pack_cache: dict[str, dict[str, Any]] = {}
        self._packed: Any = None
        # Data derived from committed columns (e.g. a scoring measure's K x K matrix), keyed by what it
        # was computed from: committed columns never change, so an entry never goes stale.
        self.derived_cache: dict[Any, Any] = {}

    # --- identity ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._storage.url

    @property
    def seed(self) -> int:
        """The store seed; perturbation k is seeded from (seed, k)."""
        return int(self._info.get("seed", 0))

    @property
    def capacity(self) -> int:
        return int(self._train_losses.shape[1])

    @property
    def chunk_rows(self) -> int:
        return int(self._train_losses.chunks[0])

    @property
    def pack_width(self) -> int:
        """Columns per compacted group (see :meth:`compact`)."""
        return int(self._info.get("pack_width", C.DEFAULT_PACK_WIDTH))

    @property
    def n_train(self) -> int:
        return int(self._train_losses.shape[0])

    @property
    def train_ids(self) -> np.ndarray:
        if self._train_ids is None:
            self._train_ids = np.array(self._train_ids_arr[:].tolist(), dtype=str)
        return self._train_ids

    def train_index(self, ids: Sequence[str]) -> np.ndarray:
        """Row indices of train ids; UnknownIdError names the first unknown one."""
        if self._train_index is None:
            self._train_index = {s: i for i, s in enumerate(self.train_ids.tolist())}
        return _lookup(self._train_index, ids, "train set")

    def __repr__(self) -> str:
        return f"LossStore({self.url!r}, n_train={self.n_train}, query_sets={self.query_sets()})"

    # --- query sets ------------------------------------------------------------------------------
    def query_sets(self) -> dict[str, int]:
        """Query-set names and their sizes m."""
        if C.QUERIES_GROUP not in self._root:
            return {}
        group = self._root[C.QUERIES_GROUP]
        return {name: int(g[C.IDS_ARRAY].shape[0]) for name, g in sorted(group.groups())}

    def _query(self, name: str) -> tuple[Any, np.ndarray, dict[str, int]]:
        if name not in self._query_cache:
            if name not in self.query_sets():
                known = ", ".join(self.query_sets()) or "none yet"
                raise UnknownQuerySetError(
                    f"unknown query set {name!r} (this store has: {known}); add one with `daunce add-queries`"
                )
            g = self._root[f"{C.QUERIES_GROUP}/{name}"]
            ids = np.array(g[C.IDS_ARRAY][:].tolist(), dtype=str)
            self._query_cache[name] = (g[C.LOSSES_ARRAY], ids, {s: i for i, s in enumerate(ids.tolist())})
        return self._query_cache[name]

    def query_ids(self, name: str) -> np.ndarray:
        return self._query(name)[1]

    def query_index(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """Row indices of query ids in query set ``name``; UnknownIdError for an unknown id."""
        return _lookup(self._query(name)[2], ids, f"query set {name!r}")

    def add_query_set(self, name: str, ids: Sequence[str] | np.ndarray) -> None:
        """Add a query set. Columns committed before it have no losses for it until
        :meth:`append_query_losses` fills them (e.g. from stored adapters)."""
        self._require_writable()
        _check_query_set_name(name)
        if name in self.query_sets():
            raise InvalidInputError(f"query set {name!r} already exists in {self.url}; pick another name")
        ids = validate_ids(ids, what=f"query set {name!r} ids")
        _create_column_arrays(
            self._root, f"{C.QUERIES_GROUP}/{name}", ids, self.capacity, self.chunk_rows
        )

    # --- commits and snapshots ------------------------------------------------------------------
    def commits(self) -> list[Commit]:
        """Every committed column, in slot order."""
        # Commit records are immutable once created (create-if-absent, never rewritten), so each is
        # fetched once per handle; a snapshot costs one listing plus the records that are new.
        keys = self._storage.list(C.COMMITS_PREFIX)
        new = [k for k in keys if k not in self._commit_cache]
        for key, rec in zip(new, self._storage.get_many(new)):
            if rec is not None:
                self._commit_cache[key] = _commit_from_record(key, rec, self.url)
        return sorted((self._commit_cache[k] for k in keys if k in self._commit_cache), key=lambda c: c.slot)

    def _committed_ids(self) -> set[str]:
        """Committed perturbation ids, from one listing (a record's name is its perturbation id)."""
        prefix = C.COMMITS_PREFIX + "/"
        return {k[len(prefix):].removesuffix(".json") for k in self._storage.list(C.COMMITS_PREFIX)}

    def snapshot(self) -> Snapshot:
        """The committed columns now. Later appends do not change a snapshot already taken."""
        commits = tuple(self.commits())
        by_set: dict[str, list[int]] = {}
        for c in commits:
            for q in c.query_sets:
                by_set.setdefault(q, []).append(c.slot)
        slot_of = {c.perturbation: c.slot for c in commits}
        for key in self._storage.list(C.QUERY_COMMITS_PREFIX):
            _, qset, fname = key.rsplit("/", 2)
            pid = fname.removesuffix(".json")
            if pid in slot_of:
                by_set.setdefault(qset, []).append(slot_of[pid])
        return Snapshot(commits, {q: tuple(sorted(set(s))) for q, s in by_set.items()})

    def num_columns(self) -> int:
        return len(self._storage.list(C.COMMITS_PREFIX))

    def is_committed(self, perturbation: str) -> bool:
        return self._storage.get(f"{C.COMMITS_PREFIX}/{perturbation}.json") is not None

    # --- appending --------------------------------------------------------------------------------
    def append(
        self,
        perturbation: str | int,
        train_losses: np.ndarray,
        query_losses: Mapping[str, np.ndarray] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        worker: str | None = None,
        lease: Lease | None = None,
    ) -> Commit:
        """Append one perturbation's loss column (train, and any query sets) and commit it atomically.

        Refused, with the store unchanged, if the perturbation is already committed, if another live
        worker leases it, or if any loss vector is invalid (NaN/inf, wrong length or dtype).
        ``metadata`` is kept in the commit record (seed, objective, hyper-parameters, hashes, ...).
        """
        self._require_writable()
        pid = _check_perturbation_id(perturbation)
        train = validate_losses(train_losses, self.n_train, what=f"train losses of {pid!r}")
        queries: dict[str, np.ndarray] = {}
        for name, values in (query_losses or {}).items():
            arr, _, _ = self._query(name)
            queries[name] = validate_losses(values, int(arr.shape[0]), what=f"query set {name!r} losses of {pid!r}")
        if self.is_committed(pid):
            raise AlreadyCommittedError(
                f"perturbation {pid!r} is already committed in {self.url}; appends are idempotent per "
                "perturbation id, so use a new id for a new column"
            )
        worker = worker or (lease.worker if lease else default_worker_name())
        self._check_lease(pid, lease)
        started = _now()
        slot = self._claim_slot(pid, worker)
        # Data first, in a slot nobody else writes; only then the record that makes it visible.
        self._write_column(self._train_losses, slot, train)
        for name, values in queries.items():
            self._write_column(self._query(name)[0], slot, values)
        record = {
            "perturbation": pid,
            "slot": slot,
            "query_sets": sorted(queries),
            "worker": worker,
            "started_at": started,
            "committed_at": _now(),
            "format_version": C.FORMAT_VERSION,
            "metadata": dict(metadata or {}),
        }
        if not self._storage.put_if_absent(f"{C.COMMITS_PREFIX}/{pid}.json", record):
            raise AlreadyCommittedError(
                f"perturbation {pid!r} was committed by another worker while this one wrote it; "
                "nothing of this attempt is visible"
            )
        if lease is not None:
            self.release(lease)
        return Commit.from_record(record)

    def append_query_losses(self, perturbation: str, name: str, losses: np.ndarray) -> None:
        """Add query-set losses to an already committed column (a query set added after it)."""
        self._require_writable()
        commit = self._storage.get(f"{C.COMMITS_PREFIX}/{perturbation}.json")
        if commit is None:
            raise InvalidInputError(f"perturbation {perturbation!r} is not committed; append it first")
        arr, _, _ = self._query(name)
        values = validate_losses(losses, int(arr.shape[0]), what=f"query set {name!r} losses of {perturbation!r}")
        key = f"{C.QUERY_COMMITS_PREFIX}/{name}/{perturbation}.json"
        if name in commit.get("query_sets", []) or self._storage.get(key) is not None:
            raise AlreadyCommittedError(f"query set {name!r} already has losses for {perturbation!r}")
        self._write_column(arr, int(commit["slot"]), values)
        if not self._storage.put_if_absent(key, {"perturbation": perturbation, "committed_at": _now()}):
            raise AlreadyCommittedError(f"query set {name!r} already has losses for {perturbation!r}")

    def _claim_slot(self, pid: str, worker: str) -> int:
        taken = self._storage.list(C.SLOTS_PREFIX)
        slot = max((int(k.rsplit("/", 1)[1].split(".")[0]) for k in taken), default=-1) + 1
        while slot < self.capacity:
            if self._storage.put_if_absent(
                f"{C.SLOTS_PREFIX}/{slot:08d}.json", {"perturbation": pid, "worker": worker, "claimed_at": _now()}
            ):
                return slot
            slot += 1
        raise CapacityError(
            f"{self.url} has used all {self.capacity} column slots; create a store with a larger --capacity"
        )

    @staticmethod
    def _write_column(arr: Any, slot: int, values: np.ndarray) -> None:
        arr[:, slot] = values

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise InvalidInputError(f"{self.url} was opened read-only; open it with mode='a' to write")

    # --- leases ---------------------------------------------------------------------------------
    def _lease_records(self, pid: str) -> list[dict[str, Any]]:
        keys = self._storage.list(f"{C.LEASES_PREFIX}/{pid}/")
        return [r for r in (self._storage.get(k) for k in keys) if r is not None]

    def _current_lease(self, pid: str) -> dict[str, Any] | None:
        records = self._lease_records(pid)
        return max(records, key=lambda r: r["generation"]) if records else None

    def _check_lease(self, pid: str, lease: Lease | None) -> None:
        current = self._current_lease(pid)
        if current is None or current.get("released") or current["expires_at"] < time.time():
            return
        if lease is None or current["token"] != lease.token:
            raise LeaseError(
                f"perturbation {pid!r} is leased by worker {current['worker']!r} until "
                f"{_dt.datetime.fromtimestamp(current['expires_at'], _dt.timezone.utc).isoformat()}; "
                "append another id, or wait for the lease to expire"
            )

    def claim(self, perturbation: str | int, *, worker: str | None = None, ttl: float = C.DEFAULT_LEASE_SECONDS) -> Lease | None:
        """Lease a perturbation id for ``ttl`` seconds; None if it is committed or leased by a live worker."""
        self._require_writable()
        pid = _check_perturbation_id(perturbation)
        current = self._current_lease(pid)
        if current is not None and not current.get("released") and current["expires_at"] >= time.time():
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
        )
        # Create-if-absent on the next generation: of two workers taking over one lease, one wins.
        if not self._storage.put_if_absent(f"{C.LEASES_PREFIX}/{pid}/{lease.generation:08d}.json", lease.record()):
            return None
        return lease

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
        renewed = dataclasses.replace(lease, generation=lease.generation + 1, expires_at=time.time() + ttl)
        if not self._storage.put_if_absent(
            f"{C.LEASES_PREFIX}/{lease.perturbation}/{renewed.generation:08d}.json", renewed.record()
        ):
            raise LeaseError(f"lease on {lease.perturbation!r} was taken over by another worker")
        return renewed

    def release(self, lease: Lease) -> None:
        """Give a lease back early (its perturbation was committed, or the worker gives up)."""
        rec = dict(lease.record(), generation=lease.generation + 1, released=True, expires_at=0.0)
        self._storage.put_if_absent(f"{C.LEASES_PREFIX}/{lease.perturbation}/{rec['generation']:08d}.json", rec)

    def leases(self) -> list[dict[str, Any]]:
        """Live (unexpired, unreleased, uncommitted) leases."""
        pids = {k.split("/")[2] for k in self._storage.list(C.LEASES_PREFIX + "/")}
        committed = self._committed_ids()
        out = []
        for pid in sorted(pids - committed):
            cur = self._current_lease(pid)
            if cur and not cur.get("released") and cur["expires_at"] >= time.time():
                out.append(cur)
        return out

    # --- reading --------------------------------------------------------------------------------
    def _resolve_slots(self, snapshot: Snapshot | None, query_set: str | None, columns: Sequence[int] | None) -> list[int]:
        if columns is not None:
            return [int(s) for s in columns]
        snap = snapshot or self.snapshot()
        if query_set is None:
            return list(snap.slots)
        self._query(query_set)
        return list(snap.query_slots.get(query_set, ()))

    def iter_row_blocks(
        self,
        *,
        snapshot: Snapshot | None = None,
        query_set: str | None = None,
        columns: Sequence[int] | None = None,
        block_rows: int | None = None,
        prefetch: int = 2,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_offset, block)``: train losses of rows ``[row_offset, row_offset + R)`` for the
        chosen slots, float32, C-contiguous, shape (R, K). A background thread reads ``prefetch``
        blocks ahead so reading overlaps whatever the consumer computes.

        ``columns`` are slots; by default all committed slots of ``snapshot`` (taken now when None),
        or those that also have losses for ``query_set``.
        """
        slots = self._resolve_slots(snapshot, query_set, columns)
        rows = int(block_rows or self.chunk_rows)
        starts = list(range(0, self.n_train, rows))
        if prefetch <= 0:
            for r0 in starts:
                yield r0, self._read_rows(self._train_losses, r0, min(r0 + rows, self.n_train), slots)
            return
        yield from _prefetched(
            (lambda r0=r0: (r0, self._read_rows(self._train_losses, r0, min(r0 + rows, self.n_train), slots)) for r0 in starts),
            depth=prefetch,
        )

    def train_losses(self, *, snapshot: Snapshot | None = None, query_set: str | None = None, columns: Sequence[int] | None = None) -> np.ndarray:
        """The whole (n, K) train loss matrix in memory (small stores; use iter_row_blocks for big ones)."""
        slots = self._resolve_slots(snapshot, query_set, columns)
        return self._read_rows(self._train_losses, 0, self.n_train, slots)

    def query_losses(self, name: str, *, snapshot: Snapshot | None = None, columns: Sequence[int] | None = None) -> np.ndarray:
        """The (m, K) loss matrix of query set ``name``, columns in the same order as the train blocks."""
        arr = self._query(name)[0]
        slots = self._resolve_slots(snapshot, name, columns)
        return self._read_rows(arr, 0, int(arr.shape[0]), slots)

    # --- compaction -----------------------------------------------------------------------------
    def compact(self, *, worker: str | None = None) -> list[int]:
        """Pack committed columns, ``pack_width`` at a time (slot order), into the wide array
        ``train/packed`` so that row-block scans read wide chunks instead of one chunk per column.

        Safe to run while workers append and other compactors run: a group is claimed with a
        create-if-absent record before its chunks are written (whole chunks, by that claimant only),
        and readers use it only once its manifest is created, after the data. A compactor killed
        midway leaves an unreferenced group; the next run packs those columns into a new one. The
        per-column chunks stay, so snapshots taken before, and readers that predate compaction, still
        read them. Returns the groups made (columns left over wait for the next run).
        """
        self._require_writable()
        width = self.pack_width
        packed = set(self._pack_map())
        todo = [c.slot for c in self.commits() if c.slot not in packed]
        made: list[int] = []
        if len(todo) < width:
            return made
        arr = self._packed_array(create=True)
        worker = worker or default_worker_name()
        while len(todo) >= width:
            group_slots, todo = todo[:width], todo[width:]
            group = self._claim_pack_group(group_slots, worker)
            rows = int(arr.chunks[0])
            c0 = group * width
            for r0 in range(0, self.n_train, rows):  # whole chunks of this group: no read-modify-write
                r1 = min(r0 + rows, self.n_train)
                arr[r0:r1, c0 : c0 + width] = self._read_rows(self._train_losses, r0, r1, group_slots, use_packs=False)
            record = {"group": group, "slots": group_slots, "worker": worker, "packed_at": _now()}
            if not self._storage.put_if_absent(f"{C.PACKS_PREFIX}/{group:08d}.json", record):
                raise CorruptRecordError(f"pack group {group} of {self.url} has a manifest this compactor did not write")
            made.append(group)
        return made

    def _claim_pack_group(self, slots: list[int], worker: str) -> int:
        taken = self._storage.list(C.PACK_CLAIMS_PREFIX)
        group = max((int(k.rsplit("/", 1)[1].split(".")[0]) for k in taken), default=-1) + 1
        while (group + 1) * self.pack_width <= self.capacity:
            if self._storage.put_if_absent(
                f"{C.PACK_CLAIMS_PREFIX}/{group:08d}.json", {"slots": slots, "worker": worker, "claimed_at": _now()}
            ):
                return group
            group += 1
        raise CapacityError(f"{self.url}: the packed array is full; create a store with a larger --capacity")

    def _pack_map(self) -> dict[int, tuple[int, int]]:
        """slot -> (group, position in group) for every packed column. Manifests are immutable, so
        each is read once; a slot packed twice (two compactors raced) uses its first group."""
        keys = self._storage.list(C.PACKS_PREFIX)
        new = [k for k in keys if k not in self._pack_cache]
        for key, rec in zip(new, self._storage.get_many(new)):
            if rec is not None:
                self._pack_cache[key] = rec
        out: dict[int, tuple[int, int]] = {}
        for key in sorted(self._pack_cache):
            rec = self._pack_cache[key]
            try:
                for j, slot in enumerate(rec["slots"]):
                    out.setdefault(int(slot), (int(rec["group"]), j))
            except (KeyError, TypeError, ValueError) as e:
                raise CorruptRecordError(f"pack manifest {key!r} of {self.url} lacks or garbles {e}") from None
        return out

    def _packed_array(self, create: bool = False) -> Any:
        if self._packed is None:
            path = f"{C.TRAIN_GROUP}/{C.PACKED_ARRAY}"
            try:
                self._packed = self._root[path]
            except KeyError:
                if not create:
                    raise CorruptRecordError(f"{self.url} has pack manifests but no {path} array; the store is damaged") from None
                try:  # every compactor creates identical metadata, so a race between two is harmless
                    self._packed = self._root.create_array(
                        path, shape=(self.n_train, self.capacity), dtype="float32",
                        chunks=(min(self.n_train, self.chunk_rows, C.PACK_ROWS), self.pack_width),
                        compressors=[Crc32cCodec()], fill_value=np.nan,
                    )
                except zarr.errors.ContainsArrayError:
                    self._packed = zarr.open_group(self._storage.zarr_store, mode="r+")[path]
        return self._packed

    def _read_rows(self, arr: Any, r0: int, r1: int, slots: Sequence[int], *, use_packs: bool = True) -> np.ndarray:
        packs = self._pack_map() if use_packs and arr is self._train_losses else {}
        if not any(s in packs for s in slots):
            return self._read_columns(arr, r0, r1, slots)
        # Packed columns come from wide chunks (one read per group), the young rest per column.
        out = np.empty((r1 - r0, len(slots)), dtype=np.float32)
        groups: dict[int, list[tuple[int, int]]] = {}
        young: list[tuple[int, int]] = []
        for j, slot in enumerate(slots):
            if slot in packs:
                group, pos = packs[slot]
                groups.setdefault(group, []).append((j, pos))
            else:
                young.append((j, slot))
        packed = self._packed_array()
        width = self.pack_width
        for group, pairs in groups.items():
            lo, hi = min(p for _, p in pairs), max(p for _, p in pairs) + 1
            try:
                block = packed[r0:r1, group * width + lo : group * width + hi]
            except (ValueError, RuntimeError) as e:
                raise CorruptChunkError(self._locate_corruption(packed, r0, r1, [group * width + p for _, p in pairs], e)) from e
            if len(groups) == 1 and not young and [p - lo for _, p in pairs] == list(range(block.shape[1])):
                return np.ascontiguousarray(block)  # the common case: one whole group, in order
            _scatter_columns(out, [(j, p - lo) for j, p in pairs], block)
        if young:
            _scatter_columns(out, [(j, i) for i, (j, _) in enumerate(young)], self._read_columns(arr, r0, r1, [s for _, s in young]))
        return out

    def _read_columns(self, arr: Any, r0: int, r1: int, slots: Sequence[int]) -> np.ndarray:
        # One 1-d read per column (each is one contiguous chunk run) into a (K, R) buffer, then a
        # transpose: measured several times faster than zarr's strided 2-d selection on 1-wide chunks.
        buf = np.empty((len(slots), r1 - r0), dtype=np.float32)
        try:
            for j, slot in enumerate(slots):
                buf[j] = arr[r0:r1, slot]
        except (ValueError, RuntimeError) as e:  # crc32c mismatch or undecodable chunk (zarrs: RuntimeError)
            raise CorruptChunkError(self._locate_corruption(arr, r0, r1, slots, e)) from e
        return np.ascontiguousarray(buf.T)

    def _locate_corruption(self, arr: Any, r0: int, r1: int, slots: Sequence[int], err: Exception) -> str:
        rows, width = int(arr.chunks[0]), int(arr.chunks[1])
        for slot in slots:
            for c0 in range(r0 - r0 % rows, r1, rows):
                try:
                    arr[c0 : min(c0 + rows, arr.shape[0]), slot]
                except (ValueError, RuntimeError) as e:
                    key = f"{arr.path}/c/{c0 // rows}/{slot // width}"
                    return (
                        f"chunk {key!r} of {self.url} is corrupt ({e}); the column in slot {slot} cannot be "
                        "read. Restore the chunk from a copy, or re-run that perturbation into a new store"
                    )
        return f"could not read rows {r0}:{r1} of {arr.path} in {self.url}: {err}"

    # --- scoring (thin wrappers over daunce_store.scoring) ----------------------------------------
    def topk(self, query_set: str, queries: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Top-k proponents/opponents per query; see :func:`daunce_store.scoring.topk_store`.

        >>> store.topk("test", ["q0"], k=5, measure="corr").to_pandas()   # doctest: +SKIP
        """
        from daunce_store.scoring import topk_store

        return topk_store(self, query_set, queries, **kwargs)

    def influence(self, query_set: str, queries: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Aggregate influence on a whole query set; see :func:`daunce_store.scoring.influence`."""
        from daunce_store.scoring import influence

        return influence(self, query_set, queries, **kwargs)

    def stability(self, query_set: str, queries: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Top-k convergence diagnostics (nested column subsets, bootstrap); see :func:`daunce_store.scoring.stability`."""
        from daunce_store.scoring import stability

        return stability(self, query_set, queries, **kwargs)

    def scores(self, query_set: str, queries: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Dense scores (in row blocks, or ``.to_numpy()`` / ``.to_pandas()``) under a measure; see
        :func:`daunce_store.scoring.scores`."""
        from daunce_store.scoring import scores

        return scores(self, query_set, queries, **kwargs)

    def self_influence(self, **kwargs: Any) -> Any:
        """Self-influence (loss variance across perturbations); see :func:`daunce_store.scoring.self_influence`."""
        from daunce_store.scoring import self_influence

        return self_influence(self, **kwargs)

    # --- export ---------------------------------------------------------------------------------
    def to_pandas(self, *, form: Literal["wide", "long"] = "wide", snapshot: Snapshot | None = None) -> Any:
        """Train and query loss matrices with their ids in one DataFrame.

        ``wide``: columns ``set``, ``id`` and one float32 column per perturbation (NaN where a query set
        has no losses for it); ``long``: ``set``, ``id``, ``perturbation``, ``loss``.

        >>> store.to_pandas().set_index(["set", "id"]).loc["train"]   # doctest: +SKIP
        """
        from daunce_store.store._export import losses_to_pandas

        return losses_to_pandas(self, form=form, snapshot=snapshot)

    def export(self, path: str | os.PathLike[str], *, form: Literal["wide", "long"] = "wide", fmt: str | None = None, snapshot: Snapshot | None = None) -> int:
        """Write :meth:`to_pandas`'s table to a .parquet, .csv or .jsonl file, one row block at a time;
        returns the number of rows written."""
        from daunce_store.store._export import export_losses

        return export_losses(self, path, form=form, fmt=fmt, snapshot=snapshot)

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A summary: sizes, committed K, live leases, bytes on disk, format version."""
        snap = self.snapshot()
        leases = self.leases()
        return {
            "url": self.url,
            "format_version": int(self._info.get("format_version", 0)),
            "n_train": self.n_train,
            "query_sets": {
                name: {"m": m, "columns": len(snap.query_slots.get(name, ()))} for name, m in self.query_sets().items()
            },
            "committed_columns": len(snap),
            "leases_in_flight": len(leases),
            "leases": [
                {"perturbation": r["perturbation"], "worker": r["worker"], "expires_at": _iso(r["expires_at"])} for r in leases
            ],
            "slots_claimed": len(self._storage.list(C.SLOTS_PREFIX)),
            "packed_columns": len(self._pack_map()),
            "capacity": self.capacity,
            "chunk_rows": self.chunk_rows,
            "seed": self.seed,
            "size_bytes": self._storage.size_bytes(),
        }


def _scatter_columns(out: np.ndarray, pairs: list[tuple[int, int]], src: np.ndarray) -> None:
    """``out[:, j] = src[:, i]`` for each (j, i), copying runs of consecutive columns as slices
    (numpy's fancy column indexing is ~40x slower than a slice copy on (2^18, 64) blocks)."""
    pairs = sorted(pairs)
    start = 0
    for end in range(1, len(pairs) + 1):
        if end == len(pairs) or pairs[end] != (pairs[end - 1][0] + 1, pairs[end - 1][1] + 1):
            j0, i0 = pairs[start]
            length = end - start
            out[:, j0 : j0 + length] = src[:, i0 : i0 + length]
            start = end


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


def _commit_from_record(key: str, rec: dict[str, Any], url: str) -> Commit:
    try:
        return Commit.from_record(rec)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(
            f"commit record {key!r} of {url} lacks or garbles {e}; it was not written by daunce-store "
            "(restore it from a copy)"
        ) from None


def _lookup(index: dict[str, int], ids: Sequence[str], what: str) -> np.ndarray:
    out = np.empty(len(ids), dtype=np.int64)
    for i, key in enumerate(ids):
        try:
            out[i] = index[str(key)]
        except KeyError:
            raise UnknownIdError(f"id {key!r} is not in the {what}; check the spelling or the set") from None
    return out


def _prefetched(thunks: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``thunks`` in a background thread, ``depth`` results ahead of the consumer."""
    results: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    _DONE = object()

    def produce() -> None:
        try:
            for thunk in thunks:
                if stop.is_set():
                    return
                results.put((True, thunk()))
        except BaseException as e:  # hand the error to the consumer
            results.put((False, e))
            return
        results.put((True, _DONE))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(produce)
        try:
            while True:
                ok, item = results.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            stop.set()
            while not results.empty():  # unblock a producer waiting on a full queue
                results.get_nowait()


def _create_column_arrays(root: Any, path: str, ids: np.ndarray, capacity: int, chunk_rows: int) -> None:
    group = root.require_group(path)
    n = len(ids)
    id_arr = group.create_array(C.IDS_ARRAY, shape=(n,), dtype=str, chunks=(min(n, 1 << 20),), overwrite=True)
    id_arr[:] = ids
    group.create_array(
        C.LOSSES_ARRAY,
        shape=(n, capacity),
        dtype="float32",
        chunks=(min(n, chunk_rows), 1),
        compressors=[Crc32cCodec()],
        fill_value=np.nan,
        overwrite=True,
    )


def init_store(
    url: str | os.PathLike[str],
    train_ids: Sequence[str] | np.ndarray,
    query_sets: Mapping[str, Sequence[str] | np.ndarray] | None = None,
    *,
    seed: int = 0,
    capacity: int = C.DEFAULT_CAPACITY,
    chunk_rows: int = C.DEFAULT_CHUNK_ROWS,
    pack_width: int | None = None,
    storage_options: dict[str, Any] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> LossStore:
    """Create a new, empty store (no columns) at ``url``; StoreExistsError if something is there."""
    ids = validate_ids(train_ids, what="train ids")
    sets = {_check_query_set_name(k): validate_ids(v, what=f"query set {k!r} ids") for k, v in (query_sets or {}).items()}
    if pack_width is None:  # columns per compacted group (see LossStore.compact)
        pack_width = min(C.DEFAULT_PACK_WIDTH, capacity)
    if capacity < 2 or chunk_rows < 1 or not 1 <= pack_width <= capacity:
        raise InvalidInputError("capacity must be >= 2, chunk_rows >= 1 and 1 <= pack_width <= capacity")
    storage = Storage(url, storage_options)
    if storage.is_file:
        raise StoreExistsError(f"{storage.url} is a file; a store is a directory, so pick another path")
    if storage.exists():
        raise StoreExistsError(f"{storage.url} already holds data; open it, or pick an empty path")
    root = zarr.open_group(storage.zarr_store, mode="w")
    _create_column_arrays(root, C.TRAIN_GROUP, ids, capacity, chunk_rows)
    for name, qids in sets.items():
        _create_column_arrays(root, f"{C.QUERIES_GROUP}/{name}", qids, capacity, chunk_rows)
    # The format attribute goes last: a crash during init leaves something that is not a store.
    root.attrs[C.ROOT_ATTR] = {
        "format": C.FORMAT_NAME,
        "format_version": C.FORMAT_VERSION,
        "seed": int(seed),
        "pack_width": int(pack_width),
        "created_at": _now(),
        **dict(attributes or {}),
    }
    return LossStore(storage, mode="a")


def open_store(url: str | os.PathLike[str], mode: Literal["r", "a"] = "a", storage_options: dict[str, Any] | None = None) -> LossStore:
    """Open an existing store; NotADaunceStoreError if there is none, StoreVersionError if too new."""
    if mode not in ("r", "a"):
        raise InvalidInputError(f"mode must be 'r' or 'a', not {mode!r}")
    storage = Storage(url, storage_options)
    if storage.is_file:
        raise NotADaunceStoreError(f"{storage.url} is a file, not a daunce store (a directory made by `daunce init`)")
    if not storage.exists():
        raise NotADaunceStoreError(f"{storage.url}: nothing there; create a store with `daunce init`")
    return LossStore(storage, mode=mode)
