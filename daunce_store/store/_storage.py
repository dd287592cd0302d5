"""Where a store lives: one object-store client for the commit log, one Zarr store for the arrays.

Both local paths and URLs (``s3://``, ``gs://``, ``az://``, ``memory://``) go through obstore, whose
``put(..., mode="create")`` is the one atomic primitive the commit log needs: ``link``/``O_EXCL`` on a
local disk, a conditional put (``If-None-Match: *``) on an object store. So the same code is safe
across processes on one machine and across machines on shared storage; no local file lock is involved.

Faults of a remote store (tests/store/test_s3_faults.py drives each through a fault-injecting proxy):
obstore retries 5xx replies, and resets of idempotent requests (reads, whole-object overwrites such as
chunk PUTs), itself. It does not retry a create-if-absent PUT whose connection broke after the request
may have been sent (a reset, a lost reply, a timeout): :meth:`Storage.put_if_absent` does, checking that
an object found there holds its own bytes. Records are small, so their requests time out in seconds
(``RECORD_REQUEST_TIMEOUT``), not after obstore's 30 s meant for bulk transfers.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import obstore
import obstore.store
import zarr.storage

from daunce_store import _constants as C
from daunce_store.errors import CorruptRecordError, InvalidInputError
from daunce_store.store._failpoints import Hook, env_hook

__all__ = ["Storage"]

# The request timeout of the commit-log client (small JSON records, <= a few KB each), unless the user's
# storage_options set one. obstore's default, 30 s, is sized for bulk transfers: a commit PUT whose reply
# was lost took 30 s to fail (tests/store/test_s3_faults.py, before this). AWS advises retrying a request
# of < 512 KB not answered within 2 s (S3 performance guidelines, "timeouts and retries"); 5 s leaves room
# for a loaded emulator, and a timeout that was premature costs one checked retry, never a record.
RECORD_REQUEST_TIMEOUT = "5s"
# Attempts of a create-if-absent PUT whose request may have reached the store (the first and three
# retries, 0.1, 0.2 and 0.4 s apart): obstore itself retries each attempt's 5xx replies and refused
# connections, so these only cover what it leaves to the caller.
CREATE_ATTEMPTS = 4


class Storage:
    """A store location: small JSON records (commit log) plus the Zarr store for the arrays.

    Parameters
    ----------
    url
        A local path, ``file://`` URL or any URL obstore understands (``s3://bucket/prefix``, ...).
    storage_options
        Passed to :func:`obstore.store.from_url` for URLs, e.g. ``{"endpoint": "http://127.0.0.1:9000",
        "access_key_id": ..., "secret_access_key": ..., "client_options": {"allow_http": True}}``.
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        if not isinstance(url, (str, os.PathLike)):
            raise InvalidInputError(f"a store location is a path or a URL string, not {type(url).__name__} {url!r}")
        url = os.fspath(url)
        if not isinstance(url, str) or not url.strip():
            raise InvalidInputError(f"store location {url!r} is empty; give a directory path or a URL such as s3://bucket/prefix")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise InvalidInputError(f"storage_options must be a dict of object-store settings, not {type(storage_options).__name__}")
        parsed = urlparse(url)
        self.url = url
        # Called as hook(kind, key) before every storage operation (store/_failpoints.py): tests aim
        # crashes and schedule races with it; None (no failpoint in the environment) costs nothing.
        self.hook: Hook | None = env_hook()
        self.is_local = parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt")
        options = dict(storage_options or {})
        self._options = options
        # The Rust reader's own client of this location (``_kernel.ObjectStoreChunks``), made by the read
        # path on first use (store/_read.py) and kept: a client holds its connection pool.
        self.chunk_client: Any = None
        if not self.is_local and parsed.scheme not in _URL_SCHEMES:
            # http(s) is a WebDAV store in obstore: it has no create-if-absent, which the commit log needs.
            raise InvalidInputError(
                f"store URL {url!r}: unsupported scheme {parsed.scheme!r}; use a local path or one of "
                f"{', '.join(s + '://' for s in _URL_SCHEMES)} (an S3-compatible server: s3:// with "
                'storage_options={"endpoint": ...})'
            )
        # Two clients of one location: ``_log`` for the commit log's small records (short request timeout on a
        # remote store) and ``_bulk`` for chunks and raw bytes (obstore's defaults, or the user's options).
        self._bulk: Any = None
        if self.is_local:
            path = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
            self.path: Path | None = path
            self._log: obstore.store.ObjectStore | None = obstore.store.LocalStore(str(path), mkdir=True) if path.is_dir() else None
            self._zarr_store: zarr.storage.StoreLike = zarr.storage.LocalStore(str(path))
        else:
            self.path = None
            if parsed.scheme == "memory":
                self._log = self._bulk = obstore.store.MemoryStore()
            else:
                try:
                    self._bulk = obstore.store.from_url(url, **options)
                    self._log = obstore.store.from_url(url, **_record_client_options(options))
                except (obstore.exceptions.BaseError, TypeError, ValueError) as e:  # bad URL or unknown option
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise InvalidInputError(f"store URL {url!r}: {first}; check the URL and storage_options") from None
            self._zarr_store = zarr.storage.ObjectStore(self._bulk)

    def rust_client_options(self) -> dict[str, str] | None:
        """The options the Rust reader's client of an ``s3://`` location is made with: the storage_options
        with ``client_options`` merged in and every value a string (booleans ``"true"``/``"false"``);
        None for a local or non-S3 location, or options that are not plain values (a credential provider),
        which only zarr-python's path (obstore) can use."""
        if self.is_local or urlparse(self.url).scheme not in ("s3", "s3a"):
            return None
        flat: dict[str, Any] = {k: v for k, v in self._options.items() if k != "client_options"}
        client = self._options.get("client_options") or {}
        if not isinstance(client, dict):
            return None
        flat.update(client)
        if not all(isinstance(v, (str, bool, int, float)) for v in flat.values()):
            return None
        return {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in flat.items()}

    # --- the commit log: small JSON records ---------------------------------------------------
    def _log_store(self) -> Any:
        if self._log is None:  # local path created after this object was made (init)
            assert self.path is not None
            self.path.mkdir(parents=True, exist_ok=True)
            self._log = obstore.store.LocalStore(str(self.path), mkdir=True)
        return self._log

    def _bulk_store(self) -> Any:
        """The client for chunks and raw bytes (the same one as the commit log's on a local disk)."""
        return self._bulk if self._bulk is not None else self._log_store()

    @property
    def is_file(self) -> bool:
        """Whether a local path names a plain file (never a store; nothing may be created there)."""
        return self.path is not None and self.path.is_file()

    def exists(self) -> bool:
        """Whether anything is stored at this location (a file, a non-empty directory, or any object
        under the prefix)."""
        if self.is_local:
            assert self.path is not None
            if self.path.is_file():
                return True
            return self.path.is_dir() and any(self.path.iterdir())
        stream = obstore.list(self._log_store(), chunk_size=1)
        return next(iter(stream), None) is not None

    def op(self, kind: str, key: str) -> None:
        """The failpoint before a storage operation (``put``, ``get``, ``list``, ``head``, ``delete``);
        chunk I/O done through Zarr calls it too, so every operation of append, compact and gc has one."""
        if self.hook is not None:
            self.hook(kind, key)

    def put_if_absent(self, key: str, record: dict[str, Any]) -> bool:
        """Atomically create ``key`` holding ``record``; False when another writer's object is there
        (nothing written).

        True also when the object already holds exactly these bytes: a retried PUT whose first attempt
        landed (its reply lost to a reset connection) or a record someone completed on our behalf (gc rolls
        a decided commit forward with the writer's own bytes). Records that decide ownership carry a nonce
        or the writer's name and time, so another writer's record never has our bytes.

        A PUT whose connection broke after its request may have reached the store (reset, reply lost,
        timed out) is retried here, obstore leaving that to the caller for a conditional PUT; when every
        attempt broke so, the object is read back: ours (an attempt landed) is True, another's False, none
        re-raises the last error."""
        data = _record_bytes(key, record)
        self.op("put", key)
        error: Exception | None = None
        for attempt in range(CREATE_ATTEMPTS):
            if attempt:
                time.sleep(0.1 * 2 ** (attempt - 1))
            try:
                obstore.put(self._log_store(), key, data, mode="create")
            except obstore.exceptions.AlreadyExistsError:
                return self.get_bytes(key) == data
            except Exception as e:
                self._raise_if_refused(key, e)
                if not _maybe_sent(e):
                    raise
                error = e
            else:
                return True
        try:
            found = self.get_bytes(key)
        except Exception:  # noqa: BLE001 - the store does not answer: report the PUT's own error
            found = None
        if found is None:
            assert error is not None
            raise error
        return found == data

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Write ``key`` (whole-object replace, atomic on both local disks and object stores; an overwrite
        is idempotent, so obstore itself retries it after a reset, a timeout or a 5xx)."""
        self._put(self._log_store(), key, _record_bytes(key, record))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write raw bytes at ``key`` (e.g. a perturbation's adapter weights); whole-object replace."""
        self._put(self._bulk_store(), key, bytes(data))

    def _put(self, client: Any, key: str, data: bytes) -> None:
        self.op("put", key)
        try:
            obstore.put(client, key, data)
        except Exception as e:
            self._raise_if_refused(key, e)
            raise

    def _raise_if_refused(self, key: str, error: Exception) -> None:
        """A write the file system or object store refused (permissions, a read-only mount) as one clear
        error; any other failure is left to the caller."""
        text = str(error)
        if isinstance(error, obstore.exceptions.UnauthenticatedError):
            raise InvalidInputError(
                f"cannot write {key!r} in {self.url}: the object store did not accept the credentials; "
                "check them (environment or storage_options)"
            ) from None
        refused = isinstance(error, (PermissionError, obstore.exceptions.PermissionDeniedError)) or (
            # obstore's LocalStore reports an OS refusal as a GenericError naming the errno (EACCES, EROFS).
            isinstance(error, obstore.exceptions.GenericError) and ("(os error 13)" in text or "(os error 30)" in text)
        )
        if refused:
            raise InvalidInputError(
                f"cannot write {key!r} in {self.url}: permission denied (the store is read-only for this user); "
                "open it with mode='r' to read, or fix its permissions"
            ) from None

    def get_bytes(self, key: str) -> bytes | None:
        """The raw bytes at ``key``, or None when there is nothing."""
        self.op("get", key)
        try:
            return bytes(obstore.get(self._bulk_store(), key).bytes())
        except FileNotFoundError:
            return None

    def get(self, key: str) -> dict[str, Any] | None:
        """The record at ``key``, None if absent; CorruptRecordError if it is not a JSON object."""
        self.op("get", key)
        try:
            data = bytes(obstore.get(self._log_store(), key).bytes())
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptRecordError(
                f"record {key!r} of {self.url} is damaged ({len(data)} bytes, not JSON: {e}); restore it from a "
                "copy, or delete it if it is a lease or an unreferenced slot"
            ) from None
        if not isinstance(record, dict):
            raise CorruptRecordError(f"record {key!r} of {self.url} holds {type(record).__name__}, not a JSON object")
        return record

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """:meth:`get` of many keys, fetched in parallel (one round trip each on an object store)."""
        if len(keys) < 8 or self.hook is not None:  # a hook sees one operation at a time, in key order
            return [self.get(k) for k in keys]
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(self.get, keys))

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""
        return sorted(self.list_modified(prefix))

    def list_modified(self, prefix: str) -> dict[str, float]:
        """Keys under ``prefix`` (recursively) -> their last modification time, in unix seconds on the
        storage's own clock (the file system's mtime, the object store's Last-Modified)."""
        self.op("list", prefix)
        try:
            listing = obstore.list(self._log_store(), prefix).collect()
        except FileNotFoundError:
            return {}
        return {str(o["path"]): o["last_modified"].timestamp() for o in listing}

    def clock(self) -> float:
        """Now, on the storage's own clock (unix seconds): the modification time of a probe object written
        and removed for the purpose. Ages compared with it never mix two hosts' clocks, so a host whose
        clock runs ahead cannot make another host's fresh record look old."""
        key = f"{C.CLOCK_PREFIX}/{uuid.uuid4().hex}.json"
        self.put_bytes(key, b"{}")
        try:
            # Read back by a listing, as the records' times are: S3 gives whole seconds in a HEAD's
            # Last-Modified but milliseconds in a listing, and a probe rounded down would make fresh records
            # look younger than they are.
            modified = self.list_modified(C.CLOCK_PREFIX).get(key)  # other gcs' probes may be listed too
        finally:
            self.delete(key)
        if modified is None:
            raise FileNotFoundError(f"the clock probe {key!r} written in {self.url} is not listed")
        return modified

    def delete(self, key: str) -> None:
        self.op("delete", key)
        try:
            obstore.delete(self._log_store(), key)
        except FileNotFoundError:
            pass

    def size_of(self, key: str) -> int | None:
        """The size in bytes of the object at ``key``, or None when there is none (one HEAD request)."""
        self.op("head", key)
        try:
            return int(obstore.head(self._log_store(), key)["size"])
        except FileNotFoundError:
            return None

    def size_bytes(self) -> int:
        """Bytes stored at this location (all objects)."""
        return sum(int(o["size"]) for o in obstore.list(self._log_store()).collect())

    @property
    def zarr_store(self) -> zarr.storage.StoreLike:
        return self._zarr_store

    # --- checks -------------------------------------------------------------------------------------
    def read_only_folder(self) -> Path | None:
        """For a local store: the first of its folders this user cannot create files in (None: all
        writable, or not local). Checks the folders appends, compaction and new query sets write into,
        not every chunk folder."""
        if self.path is None or not self.path.is_dir():
            return None
        folders = [self.path]
        train, queries = C.TRAIN_GROUP, C.QUERIES_GROUP
        for pattern in (C.LOG_PREFIX, f"{C.LOG_PREFIX}/*", train, f"{train}/*", f"{train}/*/c", queries, f"{queries}/*",
                        f"{queries}/*/*", f"{queries}/*/*/c"):
            folders.extend(p for p in sorted(self.path.glob(pattern)) if p.is_dir())
        return next((p for p in folders if not os.access(p, os.W_OK | os.X_OK)), None)

    def damaged_metadata(self) -> tuple[str, str] | None:
        """The first Zarr metadata document (``zarr.json``) of the store that is not a JSON object, with
        what is wrong with it; None when every one reads. Walks the groups (not the chunk folders); used
        to name the file when opening the store fails on its metadata."""
        if self.is_local and not (self.path is not None and self.path.is_dir()):
            return None
        pending = [""]
        while pending:
            prefix = pending.pop(0)
            try:
                listing = obstore.list_with_delimiter(self._log_store(), prefix or None)
            except Exception:  # noqa: BLE001 - a diagnosis of an error already being raised
                return None
            for obj in listing["objects"]:
                key = str(obj["path"])
                if key.rsplit("/", 1)[-1] != "zarr.json":
                    continue
                data = self.get_bytes(key) or b""
                try:
                    doc = json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    return key, f"{len(data)} bytes, not JSON: {e}"
                if not isinstance(doc, dict):
                    return key, f"holds a JSON {type(doc).__name__}, not an object"
            for sub in listing["common_prefixes"]:
                name = str(sub).rstrip("/").rsplit("/", 1)[-1]
                if name not in (C.LOG_PREFIX, "c") and str(sub).count("/") < 3:  # groups nest two deep
                    pending.append(str(sub).rstrip("/"))
        return None


# obstore URL schemes that support the create-if-absent put the commit log relies on.
_URL_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "memory")


def _record_client_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for the commit log's client: ``RECORD_REQUEST_TIMEOUT`` unless the user set a timeout."""
    client = options.get("client_options")
    if client is not None and not isinstance(client, dict):
        return options  # from_url names the mistake
    return {**options, "client_options": {"timeout": RECORD_REQUEST_TIMEOUT, **(client or {})}}


# How obstore (object_store's RetryError) describes a transport error that came after the request may have
# been sent: it retries these only for idempotent requests, and a create-if-absent PUT is not one.
_MAYBE_SENT = re.compile(r"\bkind: (Interrupted|Timeout)\b")


def _maybe_sent(error: Exception) -> bool:
    """Whether ``error`` is a broken connection of a request that may have reached the store."""
    return isinstance(error, obstore.exceptions.GenericError) and _MAYBE_SENT.search(str(error)) is not None


def _record_bytes(key: str, record: dict[str, Any]) -> bytes:
    try:
        return json.dumps(record, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise InvalidInputError(
            f"record {key!r} cannot be saved: every value in it must be JSON-serializable ({e}); "
            "pass plain numbers, strings, lists and dicts (e.g. in metadata=)"
        ) from None
