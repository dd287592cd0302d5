"""K × K matrices derived from committed columns (the score measures' Gram matrices), persisted in the store.

A preconditioned measure needs one pass over every train row to build its K × K matrix; kept here, every
later process (a ``daunce topk``, a server, a Dask driver) reads a few KB instead. One record per (kind,
column set), under ``_daunce/matrices/<kind>/<sha256 of its key>.json`` (FORMAT.md), holding its key
and the matrix:

* the key is the kind, the slots in order, each column's checksum (:func:`column_checksum`: the sha256 of
  its commit record, which is immutable and names the one write that filled the slot), the train row count
  and the train ids' sha256. A reader uses a record only when every field equals what it would compute
  from; anything else (another column set, a commit record that changed, a damaged record) is ignored and
  the matrix recomputed.
* it is created with the commit log's create-if-absent put (``Storage.put_if_absent``: link/O_EXCL on a
  local disk, ``If-None-Match: *`` on an object store), so a reader sees a whole record or none: a writer
  killed mid-write leaves nothing visible. A record is never rewritten; ``gc`` never deletes one (committed
  columns never change, so a record never goes stale: at worst it is unused).
* the matrix travels as the little-endian float64 bytes (base64) with their sha256, so it reads back with
  the bits it was written with: a persisted matrix gives the answers of the pass that made it.

Handles opened read-only (``mode="r"``) never write one.

Beside each matrix, the normalised (``-corr``) measures keep one float32 per train row, the row's scale
1/√(ū_iᵀ M ū_i) under that matrix's M (:func:`read_row_scales`): n values are too many for a JSON record,
so they are a raw little-endian float32 object named by its own sha256
(``_daunce/row-scales/<kind>/<bytes sha256>.f32``, written first; whole-object puts are atomic and a name
holds only its own bytes) and a create-if-absent JSON record under the matrix's key name
(``_daunce/row-scales/<kind>/<key sha256>.json``) holding the same key, the object's name and sha256, and
n. A reader uses them only when the key matches and the object's bytes match the record's sha256; an object
no record names (a writer killed between the two puts) is never read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import obstore

from daunce_store import _constants as C
from daunce_store.errors import DaunceStoreError

if TYPE_CHECKING:
    from daunce_store.store._records import Commit, Snapshot
    from daunce_store.store._storage import Storage


class LossStore(Protocol):
    """What these records need of a store handle (a ``LossStore``; named structurally so that this module,
    which ``_maintenance`` imports, does not import ``_loss_store`` back)."""

    @property
    def mode(self) -> str: ...
    @property
    def n_train(self) -> int: ...
    @property
    def _storage(self) -> Storage: ...
    @property
    def _train_ids_arr(self) -> Any: ...

__all__ = ["column_checksum", "read_derived_matrix", "write_derived_matrix", "derived_matrix_problem", "read_row_scales",
           "write_row_scales", "row_scales_problem"]

_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_KEY_FIELDS = ("kind", "slots", "columns", "n_train", "train_ids_sha256")


def column_checksum(commit: Commit) -> str:
    """The sha256 of a column's commit record (perturbation, slot, commit time, metadata): the identity
    of the one write that filled the slot."""
    fields = {"perturbation": commit.perturbation, "slot": commit.slot, "committed_at": commit.committed_at,
              "metadata": commit.metadata}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _key(store: LossStore, kind: str, snapshot: Snapshot, slots: Sequence[int]) -> dict[str, Any]:
    if not _KIND.match(kind):
        raise ValueError(f"a derived matrix's kind is a short lowercase name, not {kind!r}")
    by_slot = {c.slot: c for c in snapshot.commits}
    return {
        "kind": kind,
        "slots": [int(s) for s in slots],
        "columns": [column_checksum(by_slot[int(s)]) for s in slots],
        "n_train": int(store.n_train),
        "train_ids_sha256": store._train_ids_arr.attrs.get(C.IDS_DIGEST_ATTR),
    }


def _path(key: dict[str, Any], prefix: str = C.MATRICES_PREFIX) -> str:
    digest = hashlib.sha256(json.dumps({f: key[f] for f in _KEY_FIELDS}, sort_keys=True).encode()).hexdigest()
    return f"{prefix}/{key['kind']}/{digest}.json"


def read_derived_matrix(store: LossStore, kind: str, snapshot: Snapshot, slots: Sequence[int]) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The persisted ``kind`` matrix of the columns in ``slots`` and its attributes, or None when there is
    none whose key matches exactly (then the caller computes it)."""
    key = _key(store, kind, snapshot, slots)
    try:
        record = store._storage.get(_path(key))
    except DaunceStoreError:  # a damaged record is no answer; `daunce verify` names it
        return None
    if record is None or any(record.get(f) != key[f] for f in _KEY_FIELDS):
        return None
    matrix = _decode(record)
    if matrix is None or matrix.shape != (len(slots), len(slots)):
        return None
    return matrix, dict(record.get("attrs") or {})


def write_derived_matrix(store: LossStore, kind: str, snapshot: Snapshot, slots: Sequence[int], matrix: np.ndarray,
                         attrs: dict[str, Any]) -> bool:
    """Persist the ``kind`` matrix of the columns in ``slots`` (create-if-absent); True when the record is
    there afterwards with these bytes. A read-only handle writes nothing (False); a store that refuses the
    write (a read-only mount, a storage error) leaves the caller's answer as it was: this is a cache."""
    if store.mode == "r":
        return False
    key = _key(store, kind, snapshot, slots)
    data = np.ascontiguousarray(matrix, dtype="<f8").tobytes()
    record = {**key, "shape": list(np.shape(matrix)), "dtype": "<f8", "matrix": base64.b64encode(data).decode(),
              "sha256": hashlib.sha256(data).hexdigest(), "attrs": attrs, "format_version": C.FORMAT_VERSION}
    try:
        return store._storage.put_if_absent(_path(key), record)
    except (DaunceStoreError, OSError, obstore.exceptions.BaseError):
        return False


def _decode(record: dict[str, Any]) -> np.ndarray | None:
    """The record's matrix, or None when its bytes do not match its sha256 and shape."""
    try:
        data = base64.b64decode(record["matrix"], validate=True)
        shape = tuple(int(x) for x in record["shape"])
    except (KeyError, TypeError, ValueError):
        return None
    if record.get("dtype") != "<f8" or len(shape) != 2 or hashlib.sha256(data).hexdigest() != record.get("sha256") \
            or len(data) != 8 * shape[0] * shape[1]:
        return None
    return np.frombuffer(data, dtype="<f8").reshape(shape).astype(np.float64)


def derived_matrix_problem(key: str, record: dict[str, Any]) -> str | None:
    """What is wrong with the record at ``key`` (for ``verify``), or None. A record naming columns that
    are not (or no longer) committed is not wrong, only unused: readers never match it."""
    if any(f not in record for f in _KEY_FIELDS) or not isinstance(record["kind"], str) \
            or not all(isinstance(record[f], list) for f in ("slots", "columns")):
        return f"it lacks its key ({', '.join(_KEY_FIELDS)})"
    if key != _path(record):
        return "its name is not the sha256 of the key it holds"
    matrix = _decode(record)
    if matrix is None:
        return "its matrix does not match its sha256, shape or dtype"
    if matrix.shape != (len(record["slots"]), len(record["slots"])) or not np.isfinite(matrix).all():
        return f"its matrix is {matrix.shape[0]} x {matrix.shape[1]} for {len(record['slots'])} columns, or not finite"
    return None


# --- the -corr measures' per-row scales ------------------------------------------------------------------
def _scales_object(kind: str, sha256: str) -> str:
    return f"{C.SCALES_PREFIX}/{kind}/{sha256}.f32"


def read_row_scales(store: LossStore, kind: str, snapshot: Snapshot, slots: Sequence[int]) -> np.ndarray | None:
    """The persisted (n,) float32 row scales of the ``kind`` matrix of the columns in ``slots``, or None when
    there are none whose key matches exactly and whose bytes match their record."""
    key = _key(store, kind, snapshot, slots)
    try:
        record = store._storage.get(_path(key, C.SCALES_PREFIX))
        if record is None or any(record.get(f) != key[f] for f in _KEY_FIELDS) or not isinstance(record.get("sha256"), str):
            return None
        data = store._storage.get_bytes(_scales_object(kind, record["sha256"]))
    except (DaunceStoreError, OSError, obstore.exceptions.BaseError):  # damaged or unreadable: no answer; verify names it
        return None
    if data is None or hashlib.sha256(data).hexdigest() != record["sha256"] or len(data) != 4 * key["n_train"] \
            or record.get("dtype") != "<f4":
        return None
    return np.frombuffer(data, dtype="<f4")  # read-only, no copy (n × 4 bytes per handle; float32 on little-endian hosts)


def write_row_scales(store: LossStore, kind: str, snapshot: Snapshot, slots: Sequence[int], scales: np.ndarray) -> bool:
    """Persist the row scales of the ``kind`` matrix of the columns in ``slots``: the bytes object, then its
    record (create-if-absent). True when the record is there afterwards naming these bytes; a read-only handle
    or a store refusing the write gives False and changes nothing the readers see (this is a cache)."""
    if store.mode == "r":
        return False
    key = _key(store, kind, snapshot, slots)
    data = np.ascontiguousarray(scales, dtype="<f4").tobytes()
    if len(data) != 4 * key["n_train"]:
        raise ValueError(f"row scales hold {len(data) // 4} values, not one per train row ({key['n_train']})")
    sha = hashlib.sha256(data).hexdigest()
    record = {**key, "n": key["n_train"], "dtype": "<f4", "sha256": sha, "object": _scales_object(kind, sha),
              "format_version": C.FORMAT_VERSION}
    try:
        store._storage.put_bytes(_scales_object(kind, sha), data)
        return store._storage.put_if_absent(_path(key, C.SCALES_PREFIX), record)
    except (DaunceStoreError, OSError, obstore.exceptions.BaseError):
        return False


def row_scales_problem(key: str, record: dict[str, Any], data: bytes | None) -> str | None:
    """What is wrong with the row-scales record at ``key`` and the object it names (``data``: its bytes,
    None when absent), for ``verify``; None when whole."""
    if any(f not in record for f in _KEY_FIELDS) or not isinstance(record["kind"], str) or not isinstance(record.get("sha256"), str):
        return f"it lacks its key ({', '.join(_KEY_FIELDS)}) or its sha256"
    if key != _path(record, C.SCALES_PREFIX):
        return "its name is not the sha256 of the key it holds"
    if data is None:
        return f"the object it names ({_scales_object(record['kind'], record['sha256'])}) is missing"
    if hashlib.sha256(data).hexdigest() != record["sha256"] or len(data) != 4 * int(record.get("n_train") or 0) \
            or record.get("dtype") != "<f4":
        return "its object's bytes do not match its sha256, n or dtype"
    if not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
        return "its scales are not finite"
    return None
