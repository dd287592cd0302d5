"""Stores inside stores: ``init`` refuses a location inside an existing daunce store.

A store is a Zarr hierarchy whose root ``zarr.json`` carries the daunce attribute. A second store created
below it (``S/sub``, ``S/queries/x``) becomes a member of the outer hierarchy, which then no longer reads
as a store (a group without ids: ``KeyError: 'ids'``). So before creating, the ``zarr.json`` of each
ancestor is looked at: a stat per ancestor directory on a local disk, one GET per ancestor prefix on an
object store (a path is a few levels deep, so a few requests, once per ``init``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

from daunce_store import _constants as C
from daunce_store.store._storage import Storage

__all__ = ["enclosing_store"]

_ZARR_JSON = "zarr.json"


def enclosing_store(storage: Storage, storage_options: dict[str, Any] | None = None) -> str | None:
    """The location of the daunce store that ``storage`` lies inside, or None.

    ``storage_options``: those ``storage`` was made with (an object store's ancestors are read through a
    client at the bucket's root). An ancestor that cannot be read (no permission above one's own prefix)
    counts as no store: the check only refuses what it sees.
    """
    if storage.is_local:
        assert storage.path is not None
        for parent in storage.path.parents:
            marker = parent / _ZARR_JSON
            try:
                if marker.is_file() and _is_store_root(marker.read_bytes()):
                    return str(parent)
            except OSError:
                continue
        return None
    parsed = urlparse(storage.url)
    if parsed.scheme == "memory":  # each Storage gets a fresh in-memory store: nothing lies above it
        return None
    import obstore
    import obstore.store

    base = f"{parsed.scheme}://{parsed.netloc}"
    parts = [p for p in parsed.path.split("/") if p]
    try:
        client = obstore.store.from_url(base, **dict(storage_options or {}))
    except Exception:  # options that only make sense with the full URL: cannot look above it
        return None
    for depth in range(len(parts) - 1, -1, -1):
        prefix = "/".join(parts[:depth])
        try:
            data = bytes(obstore.get(client, f"{prefix}/{_ZARR_JSON}" if prefix else _ZARR_JSON).bytes())
        except Exception:  # FileNotFoundError (the usual case), or no permission to read there
            continue
        if _is_store_root(data):
            return f"{base}/{prefix}" if prefix else base
    return None


def _is_store_root(data: bytes) -> bool:
    """Whether ``data`` is the ``zarr.json`` of a daunce store's root group."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    info = attrs.get(C.ROOT_ATTR) if isinstance(attrs, dict) else None
    return isinstance(info, dict) and info.get("format") == C.FORMAT_NAME
