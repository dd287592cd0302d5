"""The loss store: per-example loss columns of K perturbed models, one committed column at a time.

The on-disk format (every key and array) is documented in FORMAT.md; names live in ``_constants``.
This module holds the store's identity, query sets, commits and appends; the read path
(``_read``), leases (``_leases``) and compaction (``_compact``) are mixed in from their own modules, and
the records they share from ``_records``.

Why it is crash- and concurrency-safe: every column is written into a slot that one writer claimed
atomically, chunks are one column wide so no two writers ever touch the same chunk, a committed slot is
never written again, and readers only look at slots named by commit records, which are created
atomically after the data is in place. Two writers of one perturbation race on the commit record and
only one wins. A killed writer leaves at most an unreferenced slot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from daunce_store import _constants as C
from daunce_store._ext import extension
from daunce_store.errors import (
    AlreadyCommittedError,
    CapacityError,
    CorruptChunkError,
    CorruptRecordError,
    InvalidInputError,
    NotADaunceStoreError,
    ReclaimedError,
    StoreExistsError,
    StoreVersionError,
    UnknownIdError,
    UnknownQuerySetError,
)
from daunce_store.store._compact import CompactionMixin, _parse_manifest
from daunce_store.store._export import export_losses, losses_to_pandas
from daunce_store.store._ids import ids_checksummed, ids_digest, plain_id_chunks, read_ids_array
from daunce_store.store._inputs import json_mapping, validate_ids, validate_losses
from daunce_store.store._leases import LeasesMixin
from daunce_store.store._maintenance import GcReport, MaintenanceMixin
from daunce_store.store._oserrors import storage_errors
from daunce_store.store._matrix import append_matrix, warn_missing_query_losses
from daunce_store.store._read import ReadPathMixin
from daunce_store.store._records import (
    Commit,
    ImmutableRecords,
    Lease,
    Snapshot,
    check_perturbation_id,
    check_query_set_name,
    claim_numbered,
    commit_from_record,
    default_worker_name,
    iso,
    now_iso,
    record_number,
)
from daunce_store.store._storage import Storage
from daunce_store.store._tables import ExportForm

__all__ = ["LossStore", "OpenMode", "Commit", "Lease", "Snapshot", "init_store", "open_store"]

S = TypeVar("S", bound="LossStore")
OpenMode = Literal["r", "a"]  # read only, or append


class LossStore(ReadPathMixin, LeasesMixin, CompactionMixin, MaintenanceMixin):
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

    def __init__(self, storage: Storage, mode: OpenMode = "a"):
        self._storage = storage
        self.mode = mode

        def damaged() -> NotADaunceStoreError | None:
            """A truncated or garbage zarr.json, named (zarr's own JSON error does not say which file)."""
            found = storage.damaged_metadata()
            if found is None:
                return None
            key, what = found
            return NotADaunceStoreError(
                f"{storage.url} is not a daunce store this package can read: its Zarr metadata file {key!r} is "
                f"damaged ({what}); restore the store (or that file) from a copy"
            )

        try:
            self._root = zarr.open_group(storage.zarr_store, mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError, zarr.errors.BaseZarrError) as e:
            # No zarr.json, a Zarr array instead of a group, or metadata that does not parse.
            raise (damaged() or NotADaunceStoreError(
                f"{storage.url} is not a daunce store (no readable Zarr group there: {type(e).__name__}); "
                "create one with `daunce init` or daunce_store.init()"
            )) from e
        attrs = self._root.attrs.get(C.ROOT_ATTR)
        if not isinstance(attrs, dict) or attrs.get("format") != C.FORMAT_NAME:
            raise NotADaunceStoreError(
                f"{storage.url} is a Zarr group but not a daunce store (no {C.ROOT_ATTR!r} attribute); "
                "point at a store made by `daunce init`"
            )
        version = attrs.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise NotADaunceStoreError(f"{storage.url}: format_version {version!r} in zarr.json is not a number; the store is damaged")
        if version > C.FORMAT_VERSION:
            raise StoreVersionError(
                f"{storage.url} has format version {version}, newer than this daunce-store reads "
                f"({C.FORMAT_VERSION}); upgrade with `pip install -U daunce-store`"
            )
        self._info = attrs
        try:
            self._train_losses = self._root[f"{C.TRAIN_GROUP}/{C.LOSSES_ARRAY}"]
            self._train_ids_arr = self._root[f"{C.TRAIN_GROUP}/{C.IDS_ARRAY}"]
            # Every group's and array's metadata, read now (concurrently) so that a damaged zarr.json is
            # named at open time, not met later as a JSON error in the middle of a command.
            for group in (C.TRAIN_GROUP, C.QUERIES_GROUP):
                if group in self._root:
                    self._root[group].members(max_depth=None)
        except KeyError as e:
            raise NotADaunceStoreError(f"{storage.url}: the train arrays are missing; the store is damaged") from e
        except (ValueError, TypeError, AttributeError, zarr.errors.BaseZarrError) as e:
            raise (damaged() or NotADaunceStoreError(
                f"{storage.url}: the store's Zarr metadata does not read ({type(e).__name__}: {e}); the store is damaged"
            )) from e
        self._train_ids: np.ndarray | None = None
        self._train_index: dict[str, int] | None = None
        self._query_cache: dict[str, tuple[Any, np.ndarray, dict[str, int]]] = {}
        self._commit_records = ImmutableRecords(storage, C.COMMITS_PREFIX, lambda key, rec: commit_from_record(key, rec, storage.url))
        self._manifests = ImmutableRecords(storage, C.PACKS_PREFIX, _parse_manifest, keep=lambda key: record_number(key) is not None)
        self._packed: Any = None
        # Data derived from committed columns (e.g. a scoring measure's K x K matrix), keyed by what it
        # was computed from: committed columns never change, so an entry never goes stale.
        self.derived_cache: dict[Any, Any] = {}

    # --- making and opening stores ------------------------------------------------------------------
    @classmethod
    def create(
        cls: type[S],
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
    ) -> S:
        """Create a new, empty store (no columns) at ``url`` (a local path or ``s3://...``); StoreExistsError
        if something is there. Perturbation k is seeded from (``seed``, k)."""
        for name, value in (("seed", seed), ("capacity", capacity), ("chunk_rows", chunk_rows), ("pack_width", pack_width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise InvalidInputError(f"{name} must be a whole number >= 0, not {value!r}")
        if query_sets is not None and not isinstance(query_sets, Mapping):
            raise InvalidInputError(f"query_sets must map a name to its ids, e.g. {{'test': ids}}, not {type(query_sets).__name__}")
        attributes = json_mapping(attributes, "attributes")
        ids = validate_ids(train_ids, what="train ids")
        sets = {check_query_set_name(k): validate_ids(v, what=f"query set {k!r} ids") for k, v in (query_sets or {}).items()}
        if pack_width is None:  # columns per compacted group (see LossStore.compact)
            pack_width = min(C.DEFAULT_PACK_WIDTH, capacity)
        if capacity < 2 or chunk_rows < 1 or not 1 <= pack_width <= capacity:
            raise InvalidInputError("capacity must be >= 2, chunk_rows >= 1 and 1 <= pack_width <= capacity")
        storage = Storage(url, storage_options)
        if storage.is_file:
            raise StoreExistsError(f"{storage.url} is a file; a store is a directory, so pick another path")
        from daunce_store.store._nesting import enclosing_store

        outer = enclosing_store(storage, storage_options)
        if outer is not None:  # written there, the new store would become part of the outer one's hierarchy
            raise StoreExistsError(
                f"{storage.url} is inside the daunce store {outer}; a store cannot hold another store, so pick a "
                "path outside it"
            )
        if storage.exists():
            raise StoreExistsError(f"{storage.url} already holds data; open it, or pick an empty path")
        left = lambda: f"what was written is not a store (its format attribute comes last): delete {storage.url} and run init again"  # noqa: E731
        with storage_errors(storage.url, "init", left):
            storage.op("put", "zarr.json")
            root = zarr.open_group(storage.zarr_store, mode="w")
            _create_column_arrays(root, C.TRAIN_GROUP, ids, capacity, chunk_rows)
            for name, qids in sets.items():
                _create_column_arrays(root, f"{C.QUERIES_GROUP}/{name}", qids, capacity, chunk_rows)
            # The format attribute goes last: a crash during init leaves something that is not a store.
            storage.op("put", "zarr.json")
            root.attrs[C.ROOT_ATTR] = {
                "format": C.FORMAT_NAME,
                "format_version": C.FORMAT_VERSION,
                "seed": int(seed),
                "pack_width": int(pack_width),
                "created_at": now_iso(),
                **dict(attributes or {}),
            }
        return cls(storage, mode="a")

    @classmethod
    def open(cls: type[S], url: str | os.PathLike[str], mode: OpenMode = "a", storage_options: dict[str, Any] | None = None) -> S:
        """Open an existing store; NotADaunceStoreError if there is none, StoreVersionError if too new."""
        if mode not in ("r", "a"):
            raise InvalidInputError(f"mode must be 'r' or 'a', not {mode!r}")
        storage = Storage(url, storage_options)
        if storage.is_file:
            raise NotADaunceStoreError(f"{storage.url} is a file, not a daunce store (a directory made by `daunce init`)")
        if not storage.exists():
            raise NotADaunceStoreError(f"{storage.url}: nothing there; create a store with `daunce init`")
        store = cls(storage, mode=mode)
        # Refuse up front: an append that met the permission error halfway would leave a claimed slot behind.
        folder = storage.read_only_folder() if mode == "a" else None
        if folder is not None:
            raise InvalidInputError(
                f"{storage.url} is read-only for this user ({folder} is not writable); open it with mode='r' to "
                "read (the `daunce` read commands do), or fix its permissions to write"
            )
        return store

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
            self._train_ids = read_ids_array(self._train_ids_arr, self.url)
        return self._train_ids

    def train_ids_at(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ids of the given train rows (any shape and order, repeats allowed), reading only the id
        chunks that hold them: naming a top-k needs k ids, not all n (6.3 s at 10M rows). The rows read
        get the checks :attr:`train_ids` makes (checksums; a blank id is a missing chunk); ids arrays
        without checksums (old stores) are read whole, since only the whole array can show a duplicate."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_train):
            bad = int(rows[(rows < 0) | (rows >= self.n_train)].flat[0])
            raise InvalidInputError(f"train row {bad} is out of range: the store has rows 0..{self.n_train - 1}")
        arr = self._train_ids_arr
        if self._train_ids is not None or not ids_checksummed(arr):
            return self.train_ids[rows]
        wanted = np.unique(rows)
        if not wanted.size:
            return np.empty(rows.shape, dtype=str)
        ids = self._ids_by_chunk(arr, wanted) if plain_id_chunks(arr) else read_ids_array(arr, self.url, wanted)
        return ids[np.searchsorted(wanted, rows)]

    def _ids_by_chunk(self, arr: Any, wanted: np.ndarray) -> np.ndarray:
        """``arr``'s ids at the sorted rows ``wanted``, read chunk by chunk past zarr-python: each chunk's
        bytes fetched (in parallel), its crc32c checked, zstd-decoded, and only the wanted strings built
        (``_kernel.vlen_utf8_take``; numcodecs without the extension). Zarr would build all 2^14 strings
        of every chunk touched, which cost more than the scoring when m·k rows are named."""
        rows = int(arr.chunks[0])
        chunks = wanted // rows
        ext = extension()

        def one(chunk: int) -> tuple[np.ndarray, list[str]]:
            key = f"{arr.path}/c/{chunk}"
            raw = self._storage.get_bytes(key)
            if raw is None:
                raise CorruptChunkError(f"chunk {key!r} of {self.url} is missing; restore it from a complete copy of the store")
            body = raw[:-4]
            if len(raw) < 4 or crc32c.crc32c(body) != int.from_bytes(raw[-4:], "little"):
                raise CorruptChunkError(f"chunk {key!r} of {self.url} fails its checksum; restore it from a copy (`daunce verify`)")
            data = bytes(numcodecs.Zstd().decode(body))
            where = np.flatnonzero(chunks == chunk)
            positions = (wanted[where] - chunk * rows).tolist()
            try:
                names = ext.vlen_utf8_take(data, positions) if ext is not None else numcodecs.VLenUTF8().decode(data)[positions].tolist()
            except (ValueError, IndexError) as e:
                raise CorruptChunkError(f"chunk {key!r} of {self.url} does not decode ({e}); restore it from a copy") from e
            return where, names

        out = np.empty(len(wanted), dtype=object)
        distinct = np.unique(chunks).tolist()
        with ThreadPoolExecutor(max_workers=min(8, len(distinct))) as pool:
            for where, names in pool.map(one, distinct):
                out[where] = names
        return out.astype(str)

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
            ids = read_ids_array(g[C.IDS_ARRAY], self.url)
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
        check_query_set_name(name)
        if name in self.query_sets():
            raise InvalidInputError(f"query set {name!r} already exists in {self.url}; pick another name")
        ids = validate_ids(ids, what=f"query set {name!r} ids")
        _create_column_arrays(
            self._root, f"{C.QUERIES_GROUP}/{name}", ids, self.capacity, self.chunk_rows
        )

    # --- commits and snapshots ------------------------------------------------------------------
    def commits(self) -> list[Commit]:
        """Every committed column, in slot order."""
        return sorted(self._commit_records.refresh().values(), key=lambda c: c.slot)

    def _committed_ids(self) -> set[str]:
        """Committed perturbation ids, from one listing (a record's name is its perturbation id)."""
        prefix = C.COMMITS_PREFIX + "/"
        return {k[len(prefix):].removesuffix(".json") for k in self._storage.list(C.COMMITS_PREFIX)}

    def snapshot(self) -> Snapshot:
        """The committed columns now. Later appends do not change a snapshot already taken."""
        commits = tuple(self.commits())
        seen: dict[int, str] = {}
        for c in commits:  # records edited by hand or copied between stores; scoring them would be wrong
            if not 0 <= c.slot < self.capacity or c.slot in seen:
                why = f"outside 0..{self.capacity - 1}" if not 0 <= c.slot < self.capacity else f"also named by {seen[c.slot]!r}"
                raise CorruptRecordError(
                    f"commit record of {c.perturbation!r} in {self.url} names slot {c.slot}, {why}; the commit log is "
                    "damaged (run `daunce verify`, restore the record from a copy)"
                )
            seen[c.slot] = c.perturbation
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

    def is_committed(self, perturbation: str | int) -> bool:
        """Whether ``perturbation`` (any spelling: ``3`` is ``000003``) has a committed column. Stores
        written before ids were canonical may hold ``3`` as written: that counts too."""
        pid = check_perturbation_id(perturbation)
        spellings = {pid, str(perturbation)}
        return any(self._storage.get(f"{C.COMMITS_PREFIX}/{p}.json") is not None for p in spellings)

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
        pid = check_perturbation_id(perturbation)
        metadata = json_mapping(metadata, "metadata")  # checked before a slot is claimed, like everything else
        if query_losses is not None and not isinstance(query_losses, Mapping):
            raise InvalidInputError(f"query_losses must map a query-set name to its losses, not {type(query_losses).__name__}")
        train = validate_losses(train_losses, self.n_train, what=f"train losses of {pid!r}")
        queries: dict[str, np.ndarray] = {}
        for name, values in (query_losses or {}).items():
            arr, _, _ = self._query(name)
            queries[name] = validate_losses(values, int(arr.shape[0]), what=f"query set {name!r} losses of {pid!r}")
        progress: dict[str, Any] = {}
        if self.is_committed(pid):
            raise AlreadyCommittedError(
                f"perturbation {pid!r} is already committed in {self.url}; appends are idempotent per "
                "perturbation id, so use a new id for a new column"
            )
        worker = worker or (lease.worker if lease else default_worker_name())
        self._check_lease(pid, lease)
        with storage_errors(self.url, f"append of perturbation {pid!r}", lambda: _append_left(pid, progress)):
            return self._append_claimed(pid, train, queries, metadata, worker, lease, progress)

    def _append_claimed(self, pid: str, train: np.ndarray, queries: dict[str, np.ndarray], metadata: Mapping[str, Any] | None,
                        worker: str, lease: Lease | None, progress: dict[str, Any]) -> Commit:
        """:meth:`append` from the slot claim on (``progress`` says how far it got, for a storage error)."""
        started = now_iso()
        slot = progress["slot"] = self._claim_slot(pid, worker)
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
            "committed_at": now_iso(),
            "format_version": C.FORMAT_VERSION,
            "metadata": dict(metadata or {}),
        }
        # The slot's fate decides it: this writer or a gc, whoever creates it first. It carries the whole
        # commit record, so a writer killed right after it is committed all the same: gc creates the
        # commit record from it (with these bytes, so a late writer's own put then succeeds).
        fate = {"fate": "committed", "perturbation": pid, "at": now_iso(), "commit": record}
        progress["deciding"] = True
        if not self._storage.put_if_absent(f"{C.FATES_PREFIX}/slot-{slot:08d}.json", fate):
            # gc took the slot while this writer filled it: remove what was written after gc's sweep.
            for arr in [self._train_losses, *(self._query(name)[0] for name in queries)]:
                self._delete_column_chunks(arr, slot, GcReport([], [], 0, 0, []))
            raise ReclaimedError(
                f"slot {slot} of {self.url} was reclaimed by `daunce gc` as leaked while this writer filled it (the write "
                f"took longer than gc's grace period); nothing of perturbation {pid!r} is visible: append it again"
            )
        progress["decided"] = True
        if not self._storage.put_if_absent(f"{C.COMMITS_PREFIX}/{pid}.json", record):
            raise AlreadyCommittedError(
                f"perturbation {pid!r} was committed by another worker while this one wrote it; "
                f"nothing of this attempt is visible (`daunce gc` reclaims its slot {slot})"
            )
        if lease is not None:
            self.release(lease)
        warn_missing_query_losses(self, [pid], queries)
        return Commit.from_record(record)

    def append_matrix(self, table_or_path: Any, *, metadata: Mapping[str, Any] | None = None) -> list[Commit]:
        """Append many perturbations' columns from one loss matrix (a table joined on ids, or .npz), all
        checked before the first append; layouts and failure semantics: ``daunce_store.store._matrix``."""
        return append_matrix(self, table_or_path, metadata=metadata)

    def append_query_losses(self, perturbation: str | int, name: str, losses: np.ndarray) -> None:
        """Add query-set losses to an already committed column (a query set added after it)."""
        self._require_writable()
        perturbation = check_perturbation_id(perturbation)
        commit = self._storage.get(f"{C.COMMITS_PREFIX}/{perturbation}.json")
        if commit is None:
            raise InvalidInputError(f"perturbation {perturbation!r} is not committed; append it first")
        arr, _, _ = self._query(name)
        values = validate_losses(losses, int(arr.shape[0]), what=f"query set {name!r} losses of {perturbation!r}")
        key = f"{C.QUERY_COMMITS_PREFIX}/{name}/{perturbation}.json"
        if name in commit.get("query_sets", []) or self._storage.get(key) is not None:
            raise AlreadyCommittedError(f"query set {name!r} already has losses for {perturbation!r}")
        self._write_column(arr, int(commit["slot"]), values)
        if not self._storage.put_if_absent(key, {"perturbation": perturbation, "committed_at": now_iso()}):
            raise AlreadyCommittedError(f"query set {name!r} already has losses for {perturbation!r}")

    def _claim_slot(self, pid: str, worker: str) -> int:
        slot = claim_numbered(self._storage, C.SLOTS_PREFIX, {"perturbation": pid, "worker": worker, "claimed_at": now_iso()}, self.capacity)
        if slot is None:
            raise CapacityError(
                f"{self.url} has used all {self.capacity} column slots; create a store with a larger --capacity"
            )
        return slot

    # --- trained weights --------------------------------------------------------------------------
    def save_adapter(self, perturbation: str, data: bytes) -> str:
        """Keep perturbation ``perturbation``'s trained weights (safetensors bytes: a LoRA adapter or a
        full state) in the store, so a query set added later can be evaluated under the same model;
        returns the key it is kept under (recorded in the commit metadata). Rewriting it is allowed
        until the column is committed: a redone perturbation writes the same weights."""
        self._require_writable()
        key = f"{C.ADAPTERS_PREFIX}/{check_perturbation_id(perturbation)}.safetensors"
        self._storage.put_bytes(key, bytes(data))
        return key

    def load_adapter(self, perturbation: str) -> bytes | None:
        """The weights kept by :meth:`save_adapter` for ``perturbation``, or None."""
        return self._storage.get_bytes(f"{C.ADAPTERS_PREFIX}/{check_perturbation_id(perturbation)}.safetensors")

    def adapter_sizes(self, snapshot: Snapshot | None = None) -> dict[str, int]:
        """Bytes of the weights kept for each committed perturbation that has them (commit metadata ``adapter``)."""
        out = {}
        for commit in (snapshot or self.snapshot()).commits:
            key = commit.metadata.get("adapter")
            size = self._storage.size_of(key) if isinstance(key, str) else None
            if size is not None:
                out[commit.perturbation] = size
        return out

    def _write_column(self, arr: Any, slot: int, values: np.ndarray) -> None:
        """Column ``slot`` of ``arr``, one chunk at a time (each write is one failpoint: store/_failpoints.py)."""
        rows, width, n = int(arr.chunks[0]), int(arr.chunks[1]), int(arr.shape[0])
        for r0 in range(0, n, rows):
            self._storage.op("put", f"{arr.path}/c/{r0 // rows}/{slot // width}")
            arr[r0 : min(r0 + rows, n), slot] = values[r0 : r0 + rows]

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise InvalidInputError(f"{self.url} was opened read-only; open it with mode='a' to write")

    # --- export ---------------------------------------------------------------------------------
    def to_pandas(self, *, form: ExportForm = "wide", snapshot: Snapshot | None = None) -> Any:
        """Train and query loss matrices with their ids in one DataFrame.

        ``wide``: columns ``set``, ``id`` and one float32 column per perturbation (NaN where a query set
        has no losses for it); ``long``: ``set``, ``id``, ``perturbation``, ``loss``.

        >>> store.to_pandas().set_index(["set", "id"]).loc["train"]   # doctest: +SKIP
        """
        return losses_to_pandas(self, form=form, snapshot=snapshot)

    def export(self, path: str | os.PathLike[str], *, form: ExportForm = "wide", fmt: str | None = None, snapshot: Snapshot | None = None) -> int:
        """Write :meth:`to_pandas`'s table to a .parquet, .csv or .jsonl file, one row block at a time;
        returns the number of rows written."""
        return export_losses(self, path, form=form, fmt=fmt, snapshot=snapshot)

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A summary: sizes, committed K, live leases, bytes on disk, format version."""
        snap = self.snapshot()
        leases = self.leases()
        leftovers = self.leftovers()
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
                {"perturbation": r["perturbation"], "worker": r["worker"], "expires_at": iso(r["expires_at"])} for r in leases
            ],
            "slots_claimed": len(self._storage.list(C.SLOTS_PREFIX)),
            # What killed writers and racing compactors left (`daunce gc` reclaims it once past its grace).
            "leaked_slots": [item["slot"] for item in leftovers["leaked_slots"] if item["state"] != "commit-pending"],
            # Decided committed, their writer gone before the commit record: `daunce gc` creates it.
            "commits_pending": [item["perturbation"] for item in leftovers["leaked_slots"] if item["state"] == "commit-pending"],
            "orphaned_groups": [item["group"] for item in leftovers["orphaned_groups"]],
            "duplicate_groups": [item["group"] for item in leftovers["duplicate_groups"]],
            "packed_columns_with_own_chunks": len(leftovers["packed_copies"]),  # gc frees these past its grace
            "stale_leases": [
                {"perturbation": r["perturbation"], "worker": r["worker"], "state": r.get("state")} for r in self.stale_leases()
            ],
            "packed_columns": len(self._pack_map()),
            "capacity": self.capacity,
            "chunk_rows": self.chunk_rows,
            "seed": self.seed,
            "size_bytes": self._storage.size_bytes(),
        }



def _append_left(pid: str, progress: dict[str, Any]) -> str:
    """What a failed append left, from how far it got (see :meth:`LossStore._append_claimed`)."""
    slot = progress.get("slot")
    if slot is None:
        return f"nothing of {pid!r} was written"
    if progress.get("decided"):
        return (f"its column (slot {slot}) is complete and decided committed: `daunce gc` creates its commit record, "
                f"or append {pid!r} again, which reports it committed")
    if progress.get("deciding"):
        return (f"nothing of {pid!r} is visible yet; if its decision record landed, `daunce gc` completes the commit, "
                f"else it reclaims slot {slot}")
    return f"nothing of {pid!r} is visible; `daunce gc` reclaims its slot {slot}"


def _lookup(index: dict[str, int], ids: Sequence[str], what: str) -> np.ndarray:
    out = np.empty(len(ids), dtype=np.int64)
    for i, key in enumerate(ids):
        try:
            out[i] = index[str(key)]
        except KeyError:
            raise UnknownIdError(f"id {key!r} is not in the {what}; check the spelling or the set") from None
    return out


def _create_column_arrays(root: Any, path: str, ids: np.ndarray, capacity: int, chunk_rows: int) -> None:
    group = root.require_group(path)
    n = len(ids)
    # Ids are checked like losses: crc32c on every chunk (checked on each read) and a digest of the whole
    # array (checked by `daunce verify`), so a flipped bit can never silently rename an example.
    # Chunks of 2^14 ids: naming a top-k decodes only the chunks of its rows (~8 ms each, against ~0.4 s
    # for a 2^20 chunk), and reading all ids is no slower (0.42 s per million, 2^20: 0.46 s).
    id_arr = group.create_array(C.IDS_ARRAY, shape=(n,), dtype=str, chunks=(min(n, 1 << 14),),
                                compressors=[ZstdCodec(), Crc32cCodec()], overwrite=True)
    id_arr[:] = ids
    id_arr.attrs[C.IDS_DIGEST_ATTR] = ids_digest(ids)
    group.create_array(
        C.LOSSES_ARRAY,
        shape=(n, capacity),
        dtype="float32",
        chunks=(min(n, chunk_rows), 1),
        compressors=[Crc32cCodec()],
        fill_value=np.nan,
        overwrite=True,
    )


# The module-level entry points of the pure store (the façade has its own: daunce_store.init / open).
init_store = LossStore.create
open_store = LossStore.open
