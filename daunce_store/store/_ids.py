"""Reading and checking the ids arrays (train ids, each query set's ids): one place for the checks every
read makes, used by the store's reads and by ``verify``."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec, VLenUTF8Codec, ZstdCodec

from daunce_store.errors import CorruptChunkError

__all__ = ["plain_id_chunks", "ids_digest", "ids_checksummed", "read_ids_array"]


def plain_id_chunks(arr: Any) -> bool:
    """Whether an ids array has the layout new stores write (vlen-utf8, zstd, crc32c; default keys), which
    :meth:`LossStore._ids_by_chunk` reads directly."""
    codecs = tuple(arr.metadata.codecs)
    return (
        len(codecs) == 3 and isinstance(codecs[0], VLenUTF8Codec) and isinstance(codecs[1], ZstdCodec)
        and isinstance(codecs[2], Crc32cCodec) and type(arr.metadata.chunk_key_encoding).__name__ == "DefaultChunkKeyEncoding"
        and getattr(arr.metadata.chunk_key_encoding, "separator", "/") == "/"
    )


def ids_digest(ids: np.ndarray) -> str:
    """The sha256 of the ids joined by newlines (the digest perturbation records call train_ids_sha256)."""
    return hashlib.sha256("\n".join(np.asarray(ids).tolist()).encode()).hexdigest()


def ids_checksummed(arr: Any) -> bool:
    """Whether an ids array's chunks carry a checksum (stores made before ids had one do not)."""
    return any(isinstance(c, Crc32cCodec) or (isinstance(c, ZstdCodec) and c.checksum) for c in arr.compressors)


def read_ids_array(arr: Any, url: str, rows: np.ndarray | None = None) -> np.ndarray:
    """An ids array (or its sorted unique ``rows``), as strings, after the checks every read can afford:
    checksums (in the codec), no empty id (an absent chunk reads as the fill value ""), and, for a whole
    old array without checksums, no duplicate (what a flipped character most often makes)."""
    try:
        ids = np.array((arr[:] if rows is None else arr.get_coordinate_selection(rows)).tolist(), dtype=str)
    except (ValueError, RuntimeError) as e:
        raise CorruptChunkError(
            f"the ids {arr.path!r} of {url} are damaged ({e}); restore the store from a copy "
            "(`daunce verify` names every damaged chunk)"
        ) from e
    blank = np.flatnonzero(ids == "")
    if len(blank):
        row = int(blank[0] if rows is None else rows[blank[0]])
        raise CorruptChunkError(
            f"chunk '{arr.path}/c/{row // int(arr.chunks[0])}' of {url} is missing: {len(blank)} ids read as empty from row "
            f"{row}; restore the chunk from a complete copy of the store"
        )
    if rows is None and not ids_checksummed(arr) and len(set(ids.tolist())) != len(ids):
        uniq, counts = np.unique(ids, return_counts=True)
        raise CorruptChunkError(
            f"the ids {arr.path!r} of {url} hold duplicates {uniq[counts > 1][:3].tolist()}: an id was damaged "
            "(this store predates id checksums, so the damage cannot be located); restore it from a copy"
        )
    return ids
