"""Housekeeping: ``verify`` (an fsck of the store) and ``gc`` (space reclaim of what killed writers and
racing compactors leave behind).

What can be left behind, and why reclaiming it is safe:

* A **leaked slot**: a writer claimed slot s (``slots/<s>``), maybe wrote some chunks, and died before its
  commit record. No reader ever reads s (readers trust commit records only). A slot's fate is decided by
  one create-if-absent record, ``fates/slot-<s>``: a writer creates it (``committed``) just before its
  commit record, ``gc`` creates it (``reclaimed``) before deleting the slot's chunks; exactly one of them
  wins, so a slow writer is never reclaimed under its feet (it fails with a clear error and commits
  nothing). ``gc`` only tries slots claimed longer ago than the grace period. Slot numbers are never
  reused; only their chunks are deleted.
* An **orphaned pack group**: a compactor claimed group g (``pack-claims/<g>``) and died before its
  manifest. Readers use a group only once its manifest exists, and the compactor creates
  ``fates/group-<g>`` (``published``) before the manifest, so ``gc`` races it the same way.
* A **duplicate pack group**: two compactors packed the same columns. Readers use a slot's lowest group
  and re-read the manifests for every row block, so once the lower group's manifest is older than the
  grace period no reader still uses the higher one: ``gc`` deletes that manifest, then its chunks.

* The **per-column copies of packed columns**: once slot s is packed in group g (its first group, the one
  readers use) and g's manifest is older than the grace period, no reader reads s's per-column chunks any
  more (readers re-read the manifests for every row block, and compactors read any copy), so ``gc`` records
  ``reclaimed/<s>`` (naming g) and deletes them. A fully compacted and reclaimed store holds each loss once.

The grace period (default an hour) covers the one window no record closes: a writer or compactor stalled
for longer than it between its fate record and the very next record. A reader that still hit a deleted
chunk would get a :class:`CorruptChunkError` naming it, never a silent NaN (the read path checks).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from daunce_store import _constants as C
from daunce_store.errors import CorruptRecordError, DaunceStoreError
from daunce_store.store._records import Commit, Snapshot, now_iso
from daunce_store.store._storage import Storage

__all__ = ["Finding", "MaintenanceMixin", "VerifyReport", "GcReport"]

DEFAULT_GRACE_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing ``verify`` found. ``kind`` is ``damage`` (data or records are wrong: exit non-zero),
    ``reclaimable`` (``gc`` frees it) or ``note`` (not wrong, but cannot be checked or is in flight)."""

    kind: str
    what: str
    key: str
    message: str

    def record(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class VerifyReport:
    url: str
    findings: list[Finding]
    checked: dict[str, int]

    @property
    def ok(self) -> bool:
        """True when nothing is damaged (reclaimable leftovers and notes are not damage)."""
        return not any(f.kind == "damage" for f in self.findings)

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.findings)


@dataclasses.dataclass
class GcReport:
    slots: list[int]  # leaked slots reclaimed
    groups: list[int]  # orphaned or duplicate pack groups reclaimed
    chunks_deleted: int
    bytes_freed: int
    skipped: list[str]
    packed_slots: list[int] = dataclasses.field(default_factory=list)  # packed slots whose per-column chunks went


def _age_seconds(stamp: str | None, now: float) -> float:
    if not stamp:
        return float("inf")  # records without a time (never written by this package) count as old
    try:
        return now - _dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return float("inf")


class MaintenanceMixin:
    """``verify``, ``gc`` and the housekeeping part of ``status`` for :class:`~daunce_store.LossStore`."""

    _storage: Storage
    _root: Any
    _train_losses: Any
    _train_ids_arr: Any
    url: str
    n_train: int
    capacity: int
    chunk_rows: int
    pack_width: int

    if TYPE_CHECKING:  # provided by LossStore and the other mixins
        def _require_writable(self) -> None: ...
        def commits(self) -> list[Commit]: ...  # type: ignore[empty-body]
        def snapshot(self) -> Snapshot: ...  # type: ignore[empty-body]
        def query_sets(self) -> dict[str, int]: ...  # type: ignore[empty-body]
        def _query(self, name: str) -> tuple[Any, np.ndarray, dict[str, int]]: ...  # type: ignore[empty-body]
        def _pack_map(self) -> dict[int, tuple[int, int]]: ...  # type: ignore[empty-body]
        def _packed_array(self, create: bool = False) -> Any: ...
        def stale_leases(self) -> list[dict[str, Any]]: ...  # type: ignore[empty-body]

    # --- the leftovers, found from the records alone (cheap: listings and small JSON) ---------------
    def _records(self, prefix: str, keep: Callable[[int], bool] | None = None) -> dict[str, dict[str, Any]]:
        """The numbered records under ``prefix`` (only those whose number ``keep`` accepts: one listing, then
        a GET for each kept record, not for all of them)."""
        keys = [k for k in self._storage.list(prefix) if keep is None or keep(self._number(k))]
        return {k: r for k, r in zip(keys, self._storage.get_many(keys)) if r is not None}

    @staticmethod
    def _number(key: str) -> int:
        return int(key.rsplit("/", 1)[1].split(".")[0])

    def _fate(self, what: str, number: int) -> dict[str, Any] | None:
        return self._storage.get(f"{C.FATES_PREFIX}/{what}-{number:08d}.json")

    @staticmethod
    def _done_key(what: str, number: int) -> str:
        return f"{C.FATES_PREFIX}/{what}-{number:08d}.done.json"

    def leftovers(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> dict[str, list[dict[str, Any]]]:
        """What killed writers and racing compactors left: ``leaked_slots`` (claimed, never committed),
        ``orphaned_groups`` (claimed, never published), ``duplicate_groups`` (packed twice), each entry
        with ``reclaimable`` (older than ``grace_seconds`` and not already reclaimed)."""
        now = time.time()
        committed_slots = {c.slot for c in self.commits()}
        done = set(self._storage.list(C.FATES_PREFIX))  # a finished reclaim leaves `<what>-<n>.done.json`
        out: dict[str, list[dict[str, Any]]] = {"leaked_slots": [], "orphaned_groups": [], "duplicate_groups": []}
        leaked = self._records(C.SLOTS_PREFIX, lambda n: n not in committed_slots and self._done_key("slot", n) not in done)
        for key, rec in leaked.items():
            slot = self._number(key)
            fate = self._fate("slot", slot)
            age = _age_seconds(rec.get("claimed_at"), now)
            out["leaked_slots"].append({
                "slot": slot, "perturbation": rec.get("perturbation"), "worker": rec.get("worker"),
                "claimed_at": rec.get("claimed_at"), "fate": (fate or {}).get("fate"), "reclaimable": age > grace_seconds,
            })
        manifests = self._records(C.PACKS_PREFIX)
        published = {self._number(k): r for k, r in manifests.items()}
        orphaned = self._records(C.PACK_CLAIMS_PREFIX, lambda n: n not in published and self._done_key("group", n) not in done)
        for key, rec in orphaned.items():
            group = self._number(key)
            fate = self._fate("group", group)
            age = _age_seconds(rec.get("claimed_at"), now)
            out["orphaned_groups"].append({
                "group": group, "slots": rec.get("slots"), "worker": rec.get("worker"), "claimed_at": rec.get("claimed_at"),
                "fate": (fate or {}).get("fate"), "reclaimable": age > grace_seconds,
            })
        first_group: dict[int, int] = {}
        for group in sorted(published):
            slots = [int(s) for s in published[group].get("slots", [])]
            covering = {first_group[s] for s in slots if s in first_group}
            if slots and all(s in first_group for s in slots):
                # Safe once every covering group's manifest is older than the grace period (module docstring).
                old_enough = all(_age_seconds(published[g].get("packed_at"), now) > grace_seconds for g in covering)
                out["duplicate_groups"].append({
                    "group": group, "slots": slots, "covered_by": sorted(covering), "packed_at": published[group].get("packed_at"),
                    "reclaimable": old_enough,
                })
                continue
            for s in slots:
                first_group.setdefault(s, group)
        # first_group is the pack map readers use (a slot's lowest published group); the reclaimed slots
        # come from one listing (their records are read by verify, which needs their groups).
        reclaimed = {self._number(k) for k in self._storage.list(C.RECLAIMED_PREFIX)}
        out["packed_copies"] = [
            {"slot": slot, "group": group, "reclaimable": _age_seconds(published[group].get("packed_at"), now) > grace_seconds}
            for slot, group in sorted(first_group.items()) if slot not in reclaimed
        ]
        return out

    def reclaimed_slots(self) -> dict[int, int]:
        """slot -> pack group, for the packed slots whose per-column chunks ``gc`` deleted."""
        prefix = C.RECLAIMED_PREFIX
        return {self._number(k): int(r.get("group", -1)) for k, r in self._records(prefix).items()}

    # --- gc -----------------------------------------------------------------------------------------
    def gc(self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False) -> GcReport:
        """Reclaim the space of leaked slots, orphaned and duplicate pack groups, and the per-column copies of
        packed columns, older than ``grace_seconds`` (see the module docstring for why this is safe beside live writers, compactors
        and readers). Idempotent; a gc killed midway is finished by the next one."""
        self._require_writable()
        found = self.leftovers(grace_seconds)
        report = GcReport([], [], 0, 0, [])
        arrays = [self._train_losses] + [self._query(name)[0] for name in self.query_sets()]
        for item in found["leaked_slots"]:
            if not item["reclaimable"]:
                continue
            if dry_run or self._decide_fate("slot", item["slot"], report):
                report.slots.append(item["slot"])
                if not dry_run:
                    for arr in arrays:
                        self._delete_column_chunks(arr, item["slot"], report)
                    self._storage.put(self._done_key("slot", item["slot"]), {"reclaimed_at": now_iso()})
        for item in found["duplicate_groups"]:
            if item["reclaimable"]:
                report.groups.append(item["group"])
                if not dry_run:  # manifest first: from then on no reader picks the group up
                    self._storage.delete(f"{C.PACKS_PREFIX}/{item['group']:08d}.json")
                    self._delete_group_chunks(item["group"], report)
                    self._storage.put(self._done_key("group", item["group"]), {"reclaimed_at": now_iso()})
        for item in found["packed_copies"]:
            if item["reclaimable"]:
                report.packed_slots.append(item["slot"])
                if not dry_run:  # the record first: from then on verify checks the packed copy only
                    self._storage.put(f"{C.RECLAIMED_PREFIX}/{item['slot']:08d}.json", {"group": item["group"], "reclaimed_at": now_iso()})
                    self._delete_column_chunks(self._train_losses, item["slot"], report)
        for item in found["orphaned_groups"]:
            if item["reclaimable"] and (dry_run or self._decide_fate("group", item["group"], report, allow_published=True)):
                report.groups.append(item["group"])
                if not dry_run:
                    self._delete_group_chunks(item["group"], report)
                    self._storage.put(self._done_key("group", item["group"]), {"reclaimed_at": now_iso()})
        return report

    def _decide_fate(self, what: str, number: int, report: GcReport, *, allow_published: bool = False) -> bool:
        """Create ``fates/<what>-<n>`` = reclaimed; True when this gc (or an earlier, killed one) owns the
        reclaim. A writer that got there first (``committed``) keeps its slot."""
        key = f"{C.FATES_PREFIX}/{what}-{number:08d}.json"
        if self._storage.put_if_absent(key, {"fate": "reclaimed", "at": now_iso()}):
            return True
        fate = (self._storage.get(key) or {}).get("fate")
        if fate == "reclaimed" or (allow_published and fate == "published"):
            return True  # a killed gc's leftovers, or a group whose manifest was dropped as a duplicate
        report.skipped.append(f"{what} {number}: its writer claimed it first ({fate}); left alone")
        return False

    def _delete_column_chunks(self, arr: Any, column: int, report: GcReport) -> None:
        rows, width = int(arr.chunks[0]), int(arr.chunks[1])
        for r in range((int(arr.shape[0]) + rows - 1) // rows):
            self._delete_chunk(f"{arr.path}/c/{r}/{column // width}", report)

    def _delete_group_chunks(self, group: int, report: GcReport) -> None:
        if f"{C.TRAIN_GROUP}/{C.PACKED_ARRAY}" not in self._root:
            return
        self._delete_column_chunks(self._packed_array(), group * self.pack_width, report)

    def _delete_chunk(self, key: str, report: GcReport) -> None:
        size = self._storage.size_of(key)
        if size is not None:
            self._storage.delete(key)
            report.chunks_deleted += 1
            report.bytes_freed += size

    # --- verify -------------------------------------------------------------------------------------
    def verify(self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS, progress: bool = False) -> VerifyReport:
        """Check everything that can be checked: records parse and agree, every committed column's chunks
        are present, pass their crc32c and hold finite losses, packed groups equal their columns, ids are
        intact; and list what ``gc`` can reclaim and the stale leases. Reads every committed chunk once
        (``progress``: a progress bar on stderr)."""
        findings: list[Finding] = []
        checked: dict[str, int] = {"records": 0, "chunks": 0, "ids_arrays": 0}
        try:
            commits = self.commits()
        except CorruptRecordError as e:
            return VerifyReport(self.url, [Finding("damage", "record", "", str(e))], checked)
        findings += self._check_records(commits, checked)
        findings += self._check_ids(checked)
        try:
            snap = self.snapshot()
        except CorruptRecordError as e:  # two commits on one slot: named above by _check_records
            findings.append(Finding("note", "chunk", "", f"column chunks not checked until the commit log is repaired ({e})"))
        else:
            findings += self._check_columns(snap, checked, progress)
        try:
            found = self.leftovers(grace_seconds)
        except CorruptRecordError as e:
            found = {}
            findings.append(Finding("damage", "record", "", str(e)))
        for item in found.get("leaked_slots", []):
            findings.append(Finding("reclaimable" if item["reclaimable"] else "note", "leaked-slot", f"{C.SLOTS_PREFIX}/{item['slot']:08d}.json",
                                    f"slot {item['slot']} was claimed by {item['worker']} for {item['perturbation']!r} at {item['claimed_at']} "
                                    f"and never committed ({'`daunce gc` reclaims it' if item['reclaimable'] else 'possibly still being written'})"))
        for item in found.get("orphaned_groups", []):
            findings.append(Finding("reclaimable" if item["reclaimable"] else "note", "orphaned-group", f"{C.PACK_CLAIMS_PREFIX}/{item['group']:08d}.json",
                                    f"pack group {item['group']} was claimed by {item['worker']} and never published"))
        for item in found.get("duplicate_groups", []):
            findings.append(Finding("reclaimable" if item["reclaimable"] else "note", "duplicate-group", f"{C.PACKS_PREFIX}/{item['group']:08d}.json",
                                    f"pack group {item['group']} repeats columns of group(s) {item['covered_by']} (two compactors raced)"))
        try:
            for lease in self.stale_leases():
                findings.append(Finding("note", "stale-lease", f"{C.LEASES_PREFIX}/{lease['perturbation']}",
                                        f"lease on {lease['perturbation']!r} by {lease['worker']} is {lease.get('state', 'stale')}; the next worker takes it over"))
        except (CorruptRecordError, KeyError) as e:
            findings.append(Finding("damage", "record", C.LEASES_PREFIX, f"a lease record is damaged: {e}"))
        return VerifyReport(self.url, findings, checked)

    def _check_records(self, commits: list[Commit], checked: dict[str, int]) -> Iterator[Finding]:
        slots = self._records(C.SLOTS_PREFIX)
        checked["records"] += len(commits) + len(slots)
        by_slot: dict[int, str] = {}
        sets = set(self.query_sets())
        for c in commits:
            key = f"{C.COMMITS_PREFIX}/{c.perturbation}.json"
            claim = slots.get(f"{C.SLOTS_PREFIX}/{c.slot:08d}.json")
            if not 0 <= c.slot < self.capacity:
                yield Finding("damage", "record", key, f"commit of {c.perturbation!r} names slot {c.slot}, outside 0..{self.capacity - 1}")
            elif c.slot in by_slot:
                yield Finding("damage", "record", key, f"commits {by_slot[c.slot]!r} and {c.perturbation!r} both name slot {c.slot}")
            elif claim is None or claim.get("perturbation") != c.perturbation:
                holder = None if claim is None else claim.get("perturbation")
                yield Finding("damage", "record", key, f"commit of {c.perturbation!r} names slot {c.slot}, whose claim record is {holder!r}")
            by_slot.setdefault(c.slot, c.perturbation)
            for q in c.query_sets:
                if q not in sets:
                    yield Finding("damage", "record", key, f"commit of {c.perturbation!r} has losses for query set {q!r}, which the store lacks")
        committed = {c.perturbation for c in commits}
        for key in self._storage.list(C.QUERY_COMMITS_PREFIX):
            checked["records"] += 1
            _, qset, fname = key.rsplit("/", 2)
            if fname.removesuffix(".json") not in committed or qset not in sets:
                yield Finding("damage", "record", key, "query-set losses recorded for a perturbation or set the store does not have")
        for group, slots_of in ((self._number(k), r.get("slots", [])) for k, r in self._records(C.PACKS_PREFIX).items()):
            checked["records"] += 1
            stray = [s for s in slots_of if s not in by_slot]
            if stray:
                yield Finding("damage", "record", f"{C.PACKS_PREFIX}/{group:08d}.json", f"pack group {group} lists slots {stray[:5]} that are not committed")

    def _check_ids(self, checked: dict[str, int]) -> Iterator[Finding]:
        from daunce_store.store._loss_store import ids_checksummed, ids_digest, read_ids_array

        arrays = [self._train_ids_arr] + [self._root[f"{C.QUERIES_GROUP}/{name}/{C.IDS_ARRAY}"] for name in self.query_sets()]
        for arr in arrays:
            checked["ids_arrays"] += 1
            try:
                ids = read_ids_array(arr, self.url)
            except DaunceStoreError as e:
                yield Finding("damage", "ids", arr.path, str(e))
                continue
            digest = arr.attrs.get(C.IDS_DIGEST_ATTR)
            if digest is not None and digest != ids_digest(ids):
                yield Finding("damage", "ids", arr.path, f"the ids of {arr.path} do not match their recorded sha256: an id was changed")
            elif digest is None or not ids_checksummed(arr):
                yield Finding("note", "ids", arr.path, f"the ids of {arr.path} predate id checksums: checked for blanks and duplicates only "
                                                        "(a changed id that is still unique cannot be detected)")

    def _check_columns(self, snap: Snapshot, checked: dict[str, int], progress: bool) -> Iterator[Finding]:
        reclaimed = self.reclaimed_slots()
        targets: list[tuple[Any, list[int]]] = [(self._train_losses, [s for s in snap.slots if s not in reclaimed])]
        for name in self.query_sets():
            targets.append((self._query(name)[0], list(snap.query_slots.get(name, ()))))
        total = sum(len(s) * -(-int(a.shape[0]) // int(a.chunks[0])) for a, s in targets)
        with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
            task = bar.add_task(f"verifying {total} chunks", total=total)
            for arr, slots in targets:
                yield from self._check_chunks(arr, slots, checked, lambda: bar.advance(task))
        packs = self._pack_map()
        for slot, group in sorted(reclaimed.items()):
            if slot in snap.slots and slot not in packs:
                yield Finding("damage", "record", f"{C.RECLAIMED_PREFIX}/{slot:08d}.json",
                              f"slot {slot}'s per-column chunks were reclaimed, but no published pack group holds it (group {group}): its losses are lost")
        if packs:
            yield from self._check_packs(checked, reclaimed)

    def _check_chunks(self, arr: Any, columns: list[int], checked: dict[str, int], tick: Callable[[], None]) -> Iterator[Finding]:
        rows, width = int(arr.chunks[0]), int(arr.chunks[1])
        n = int(arr.shape[0])
        for col in columns:
            for r0 in range(0, n, rows):
                key = f"{arr.path}/c/{r0 // rows}/{col // width}"
                checked["chunks"] += 1
                tick()
                if self._storage.size_of(key) is None:
                    yield Finding("damage", "chunk", key, f"chunk {key!r} of committed column {col} is missing")
                    continue
                try:
                    values = arr[r0 : min(r0 + rows, n), col]
                except (ValueError, RuntimeError) as e:
                    yield Finding("damage", "chunk", key, f"chunk {key!r} fails its checksum or does not decode ({e})")
                    continue
                if not np.isfinite(values).all():
                    yield Finding("damage", "chunk", key, f"chunk {key!r} holds NaN or inf in committed column {col}")

    def _check_packs(self, checked: dict[str, int], reclaimed: dict[int, int]) -> Iterator[Finding]:
        """Every published group's wide chunks are present, finite, and equal the columns they copy (where
        those still have their own chunks)."""
        packed = self._packed_array()
        rows, n, width = int(packed.chunks[0]), self.n_train, self.pack_width
        for key, rec in self._records(C.PACKS_PREFIX).items():
            group, slots = self._number(key), [int(s) for s in rec.get("slots", [])]
            for r0 in range(0, n, rows):
                r1, chunk = min(r0 + rows, n), f"{packed.path}/c/{r0 // rows}/{group}"
                checked["chunks"] += 1
                if self._storage.size_of(chunk) is None:
                    yield Finding("damage", "chunk", chunk, f"packed chunk {chunk!r} of group {group} is missing")
                    continue
                try:
                    copy = packed[r0:r1, group * width : group * width + len(slots)]
                    kept = [j for j, s in enumerate(slots) if s not in reclaimed]
                    source = np.stack([self._train_losses[r0:r1, slots[j]] for j in kept], axis=1) if kept else None
                except (ValueError, RuntimeError) as e:
                    yield Finding("damage", "chunk", chunk, f"rows {r0}:{r1} of pack group {group} or its columns cannot be read ({e})")
                    continue
                if not np.isfinite(copy).all():
                    yield Finding("damage", "chunk", chunk, f"packed chunk {chunk!r} of group {group} holds NaN or inf")
                elif source is not None and not np.array_equal(copy[:, kept], source):
                    yield Finding("damage", "chunk", chunk, f"packed chunk {chunk!r} differs from the columns {slots[:4]}... it copies")
