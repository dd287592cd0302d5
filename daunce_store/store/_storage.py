"""Where a store lives: one object-store client for the commit log, one Zarr store for the arrays.

Both local paths and URLs (``s3://``, ``gs://``, ``az://``, ``memory://``) go through obstore, whose
``put(..., mode="create")`` is the one atomic primitive the commit log needs: ``link``/``O_EXCL`` on a
local disk, a conditional put (``If-None-Match: *``) on an object store. So the same code is safe
across processes on one machine and across machines on shared storage; no local file lock is involved.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import obstore
import obstore.store
import zarr.storage

from daunce_store.errors import CorruptRecordError

__all__ = ["Storage"]


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
        url = os.fspath(url)
        parsed = urlparse(url)
        self.url = url
        self.is_local = parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt")
        options = dict(storage_options or {})
        if self.is_local:
            path = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
            self.path: Path | None = path
            self._log = obstore.store.LocalStore(str(path), mkdir=True) if path.is_dir() else None
            self._zarr_store: zarr.storage.StoreLike = zarr.storage.LocalStore(str(path))
        else:
            self.path = None
            if parsed.scheme == "memory":
                self._log = obstore.store.MemoryStore()
            else:
                self._log = obstore.store.from_url(url, **options)
            self._zarr_store = zarr.storage.ObjectStore(self._log)

    # --- the commit log: small JSON records ---------------------------------------------------
    def _log_store(self) -> Any:
        if self._log is None:  # local path created after this object was made (init)
            assert self.path is not None
            self.path.mkdir(parents=True, exist_ok=True)
            self._log = obstore.store.LocalStore(str(self.path), mkdir=True)
        return self._log

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

    def put_if_absent(self, key: str, record: dict[str, Any]) -> bool:
        """Atomically create ``key`` holding ``record``; False when it already exists (nothing written)."""
        data = json.dumps(record, sort_keys=True).encode()
        try:
            obstore.put(self._log_store(), key, data, mode="create")
        except obstore.exceptions.AlreadyExistsError:
            return False
        return True

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Write ``key`` (whole-object replace, atomic on both local disks and object stores)."""
        obstore.put(self._log_store(), key, json.dumps(record, sort_keys=True).encode())

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write raw bytes at ``key`` (e.g. a perturbation's adapter weights); whole-object replace."""
        obstore.put(self._log_store(), key, bytes(data))

    def get_bytes(self, key: str) -> bytes | None:
        """The raw bytes at ``key``, or None when there is nothing."""
        try:
            return bytes(obstore.get(self._log_store(), key).bytes())
        except FileNotFoundError:
            return None

    def get(self, key: str) -> dict[str, Any] | None:
        """The record at ``key``, None if absent; CorruptRecordError if it is not a JSON object."""
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
        if len(keys) < 8:
            return [self.get(k) for k in keys]
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(self.get, keys))

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""
        try:
            listing = obstore.list(self._log_store(), prefix).collect()
        except FileNotFoundError:
            return []
        return sorted(str(o["path"]) for o in listing)

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._log_store(), key)
        except FileNotFoundError:
            pass

    def size_of(self, key: str) -> int | None:
        """The size in bytes of the object at ``key``, or None when there is none (one HEAD request)."""
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
