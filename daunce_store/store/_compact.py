"""Compaction: committed columns, ``pack_width`` at a time, copied into the wide array ``train/packed``.

A group is claimed with a create-if-absent record (``pack-claims/<g>``) before its chunks are written, and
published by its manifest (``packs/<g>``), created after the data; readers use a group only once its
manifest exists. Wide chunks scan several times faster than one-wide ones (bench/RESULTS.md, "Store
layout").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from daunce_store import _constants as C
from daunce_store.errors import CapacityError, CorruptRecordError, ReclaimedError
from daunce_store.store._maintenance import GcReport
from daunce_store.store._oserrors import storage_errors
from daunce_store.store._records import claim_numbered, default_worker_name, now_iso
from daunce_store.store._shape import StoreShape

__all__ = ["CompactionMixin"]


def _parse_manifest(key: str, rec: dict[str, Any]) -> tuple[int, list[int]]:
    try:
        return int(rec["group"]), [int(s) for s in rec["slots"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(f"pack manifest {key!r} lacks or garbles {e}; restore it from a copy") from None


class CompactionMixin(StoreShape):
    """The compaction methods of :class:`~daunce_store.LossStore`."""

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
        made: list[int] = []
        left = lambda: (f"the groups made before it ({made}) are published; a group in progress stays claimed and the "  # noqa: E731
                        "next `daunce gc` reclaims it; committed columns are untouched")
        with storage_errors(self.url, "compact", left):
            return self._compact(worker or default_worker_name(), made)

    def _compact(self, worker: str, made: list[int]) -> list[int]:
        width = self.pack_width
        packed = set(self._pack_map())
        todo = [c.slot for c in self.commits() if c.slot not in packed]
        if len(todo) < width:
            return made
        arr = self._packed_array(create=True)
        while len(todo) >= width:
            group_slots, todo = todo[:width], todo[width:]
            group = claim_numbered(self._storage, C.PACK_CLAIMS_PREFIX, {"slots": group_slots, "worker": worker, "claimed_at": now_iso()},
                                   self.capacity // width)
            if group is None:
                raise CapacityError(f"{self.url}: the packed array is full; create a store with a larger --capacity")
            rows = int(arr.chunks[0])
            c0 = group * width
            for r0 in range(0, self.n_train, rows):  # whole chunks of this group: no read-modify-write
                r1 = min(r0 + rows, self.n_train)
                # Any copy will do: a column already packed by a compactor that raced this one may have had
                # its per-column chunks reclaimed by gc since.
                self._storage.op("get", f"{self._train_losses.path}/rows/{r0}:{r1}")
                block = self._read_rows(self._train_losses, r0, r1, group_slots)
                self._storage.op("put", f"{arr.path}/c/{r0 // rows}/{group}")
                arr[r0:r1, c0 : c0 + width] = block
            record = {"group": group, "slots": group_slots, "worker": worker, "packed_at": now_iso()}
            # Whoever is first decides the group's fate: this compactor, or a gc that took it for orphaned. The
            # fate carries the manifest, so a compactor killed right after it is published all the same (gc
            # creates the manifest from it).
            fate = {"fate": "published", "at": now_iso(), "manifest": record}
            if not self._storage.put_if_absent(f"{C.FATES_PREFIX}/group-{group:08d}.json", fate):
                self._delete_column_chunks(arr, c0, GcReport([], [], 0, 0, []))  # what it wrote after gc's sweep
                raise ReclaimedError(f"pack group {group} of {self.url} was reclaimed by `daunce gc` while this compactor wrote it; run compact again")
            if not self._storage.put_if_absent(f"{C.PACKS_PREFIX}/{group:08d}.json", record):
                raise CorruptRecordError(f"pack group {group} of {self.url} has a manifest this compactor did not write")
            made.append(group)
        return made

    def _pack_map(self) -> dict[int, tuple[int, int]]:
        """slot -> (group, position in group) for every packed column; a slot packed twice (two
        compactors raced) uses its first group."""
        out: dict[int, tuple[int, int]] = {}
        for group, slots in self._manifests.refresh().values():
            for j, slot in enumerate(slots):
                out.setdefault(slot, (group, j))
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
