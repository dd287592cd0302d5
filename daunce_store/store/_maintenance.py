"""Housekeeping: ``verify`` (an fsck of the store) and ``gc`` (space reclaim of what killed writers and
racing compactors leave behind).

gc's safety, as invariants (FORMAT.md "What gc may delete" says the same for other implementations):

1. **Only a record gc created, or an immutable record that rules a copy out, licenses a delete.** gc deletes
   a slot's chunks only after it created ``fates/slot-<s>`` = ``reclaimed`` (create-if-absent: the writer,
   which creates ``committed`` there before its commit record, then fails and commits nothing), or when the
   commit record of the slot's perturbation names another slot (commit records are never rewritten, so this
   slot can never become visible). It deletes a pack group's chunks only after it created
   ``fates/group-<g>`` = ``reclaimed`` (the compactor then never publishes it), or after it retired the
   group as a duplicate (2.). A missing record is never a licence: it is damage to report.
2. **gc never deletes a group whose fate is ``published``**, except a duplicate it retired itself: it first
   reads back, checksums included, the lower group(s) that hold the same columns (the copy readers use),
   then creates ``fates/group-<g>.retired.json``, then deletes the manifest, then the chunks.
3. **A column's own chunks go only after gc has read back a complete packed copy that a manifest names**,
   checksums included, and found it bit-identical to them; then it records ``reclaimed/<s>`` naming the
   group, then deletes them. No chunk that a commit or manifest can name is deleted otherwise.
4. **Decided outcomes are completed, never undone.** A writer killed between its fate record and its commit
   record has decided: the fate carries the whole commit record, and gc creates it (the same bytes the
   writer would have written; a fate written by an older version, without the copy, gets a record rebuilt
   from the fate and the slot's claim). Likewise a compactor's ``published`` fate carries its manifest. So a
   committed-but-unrecorded slot is neither leaked forever nor reclaimed from under a slow writer, and a
   missing manifest is restored, never taken as "orphaned".
5. **No decision rests on absence that may be racing.** Claims are listed before the records that complete
   them (slots before commits, pack claims before manifests); a claim whose completing record is missing is
   then decided by its create-if-absent fate alone, so a record that appears between two listings changes
   nothing.
6. **No decision compares two hosts' clocks.** Ages are the storage's own modification times (file mtime,
   object Last-Modified) against a probe object gc writes and removes (:meth:`Storage.clock`): one clock,
   the storage's. An epoch record would need every writer to take part; the probe needs nobody. The grace
   period (default an hour) is no longer what keeps committed data safe (1.-4. do, at any grace, even 0): it
   spares live writers and compactors a failed attempt, and readers that still use a higher duplicate group
   or a column's own chunks (they re-read the manifests for every row block) a :class:`CorruptChunkError`.

What can be left behind: a **leaked slot** (claimed, never decided: its writer died before its fate record,
or it lost a commit race), an **orphaned pack group** (claimed, never published), a **duplicate pack group**
(two compactors packed the same columns) and the **per-column copies of packed columns**. A gc killed midway
is finished by the next one (each step's record comes before its deletes; ``<what>-<n>.done.json`` after).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from daunce_store import _constants as C
from daunce_store.errors import CorruptRecordError, DaunceStoreError
from daunce_store.store._derived import derived_matrix_problem, row_scales_problem
from daunce_store.store._ids import ids_checksummed, ids_digest, read_ids_array
from daunce_store.store._oserrors import storage_errors
from daunce_store.store._records import Commit, Snapshot, now_iso, record_number
from daunce_store.store._shape import StoreShape
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
    completed: list[str] = dataclasses.field(default_factory=list)  # commits and manifests gc created from their fates


class MaintenanceMixin(StoreShape):
    """``verify``, ``gc`` and the housekeeping part of ``status`` for :class:`~daunce_store.LossStore`."""

    # --- the leftovers, found from the records alone (cheap: listings and small JSON) ---------------
    def _records(self, prefix: str, keep: Callable[[int], bool] | None = None) -> dict[str, dict[str, Any]]:
        """The numbered records under ``prefix`` (only those whose number ``keep`` accepts: one listing, then
        a GET for each kept record, not for all of them). Stray keys (not numbered records) are skipped."""
        keys = [k for k in self._storage.list(prefix) if (n := record_number(k)) is not None and (keep is None or keep(n))]
        return {k: r for k, r in zip(keys, self._storage.get_many(keys)) if r is not None}

    @staticmethod
    def _number(key: str) -> int:
        number = record_number(key)
        assert number is not None, key  # callers pass keys listed by _records
        return number

    def _fate(self, what: str, number: int) -> dict[str, Any] | None:
        return self._storage.get(self._fate_key(what, number))

    @staticmethod
    def _fate_key(what: str, number: int, suffix: str = "") -> str:
        return f"{C.FATES_PREFIX}/{what}-{number:08d}{suffix}.json"

    @staticmethod
    def _done_key(what: str, number: int) -> str:
        return MaintenanceMixin._fate_key(what, number, ".done")

    def stray_records(self) -> list[str]:
        """Keys under ``_daunce/`` that no part of this package writes (a note in ``verify``; ignored by
        everything else)."""
        known = {C.SLOTS_PREFIX, C.PACK_CLAIMS_PREFIX, C.PACKS_PREFIX, C.FATES_PREFIX, C.RECLAIMED_PREFIX}
        out = []
        for key in self._storage.list(C.LOG_PREFIX):
            folder = key.rsplit("/", 1)[0]
            if folder in known and record_number(key) is None:
                out.append(key)
            elif folder not in known and not key.startswith((C.COMMITS_PREFIX + "/", C.QUERY_COMMITS_PREFIX + "/", C.LEASES_PREFIX + "/",
                                                                C.ADAPTERS_PREFIX + "/", C.CLOCK_PREFIX + "/", C.MATRICES_PREFIX + "/",
                                                                C.SCALES_PREFIX + "/")):
                out.append(key)
        return out

    def leftovers(self, grace_seconds: float = DEFAULT_GRACE_SECONDS, *, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """What killed writers and racing compactors left: ``leaked_slots``, ``orphaned_groups``,
        ``duplicate_groups`` and ``packed_copies``, each entry with its ``state`` and ``reclaimable``
        (``gc`` acts on it now). ``now`` is the storage's clock (gc passes :meth:`Storage.clock`); without
        it this host's clock classifies what is old enough, which decides nothing (verify, status)."""
        now = time.time() if now is None else now
        # Both on the storage's clock; >= so that grace 0 means "everything", also where that clock counts whole seconds.
        old = lambda modified: now - modified >= grace_seconds  # noqa: E731
        # Claims first, then what completes them (invariant 5).
        slot_claims = self._storage.list_modified(C.SLOTS_PREFIX)
        committed = {c.slot: c.perturbation for c in self.commits()}
        slot_of = {pid: slot for slot, pid in committed.items()}
        fates = self._storage.list_modified(C.FATES_PREFIX)
        # Slots a manifest or a reclaimed record names were committed: never reclaimed, whatever else is missing.
        named = {n for n in map(record_number, self._storage.list(C.RECLAIMED_PREFIX)) if n is not None}
        named |= {slot for _, slots in self._manifests.refresh().values() for slot in slots}
        out: dict[str, list[dict[str, Any]]] = {"leaked_slots": [], "orphaned_groups": [], "duplicate_groups": [], "packed_copies": []}
        for key, modified in sorted(slot_claims.items()):
            slot = record_number(key)
            if slot is None or slot in committed or self._done_key("slot", slot) in fates:
                continue
            claim = self._storage.get(key) or {}
            fate = self._fate("slot", slot) if self._fate_key("slot", slot) in fates else None
            pid = claim.get("perturbation")
            state, reclaimable = _slot_state(fate, slot_of.get(pid) if pid in slot_of else self._commit_slot(pid), slot)
            if state == "committed":
                continue  # its commit record appeared after the listing: not a leftover
            if state == "undecided" and slot in named:
                state = "unrecorded"  # a manifest or reclaimed record proves it was committed: its record is missing
            elif state == "undecided":
                reclaimable = old(modified)
            out["leaked_slots"].append({
                "slot": slot, "perturbation": pid, "worker": claim.get("worker"), "claimed_at": claim.get("claimed_at"),
                "fate": (fate or {}).get("fate"), "state": state, "reclaimable": reclaimable, "age": now - modified,
            })
        group_claims = self._storage.list_modified(C.PACK_CLAIMS_PREFIX)
        manifest_times = self._storage.list_modified(C.PACKS_PREFIX)
        published = {self._number(k): r for k, r in self._records(C.PACKS_PREFIX).items()}
        for key, modified in sorted(group_claims.items()):
            group = record_number(key)
            if group is None or group in published or self._done_key("group", group) in fates:
                continue
            claim = self._storage.get(key) or {}
            fate = self._fate("group", group) if self._fate_key("group", group) in fates else None
            retired = self._fate_key("group", group, ".retired") in fates
            state, reclaimable = _group_state(fate, retired)
            if state == "undecided":
                reclaimable = old(modified)
            out["orphaned_groups"].append({
                "group": group, "slots": claim.get("slots"), "worker": claim.get("worker"), "claimed_at": claim.get("claimed_at"),
                "fate": (fate or {}).get("fate"), "state": state, "reclaimable": reclaimable,
                "age": now - (fates.get(self._fate_key("group", group)) or modified),
            })
        manifest_age = {g: now - manifest_times.get(f"{C.PACKS_PREFIX}/{g:08d}.json", now) for g in published}
        first_group: dict[int, int] = {}
        for group in sorted(published):
            slots = [int(s) for s in published[group].get("slots", [])]
            covering = {first_group[s] for s in slots if s in first_group}
            if slots and all(s in first_group for s in slots):
                out["duplicate_groups"].append({
                    "group": group, "slots": slots, "covered_by": sorted(covering), "packed_at": published[group].get("packed_at"),
                    # readers move to the covering group(s) once they see their manifests (invariant 6)
                    "reclaimable": all(manifest_age[g] >= grace_seconds for g in covering),
                })
                continue
            for s in slots:
                first_group.setdefault(s, group)
        # first_group is the pack map readers use (a slot's lowest published group).
        reclaimed = {n for n in map(record_number, self._storage.list(C.RECLAIMED_PREFIX)) if n is not None}
        out["packed_copies"] = [
            {"slot": slot, "group": group, "state": "packed", "reclaimable": manifest_age[group] >= grace_seconds}
            for slot, group in sorted(first_group.items()) if slot not in reclaimed and slot in committed
        ]
        # A gc killed between a slot's reclaimed record and the end of its deletes: the record is the licence.
        out["packed_copies"] += [
            {"slot": slot, "group": first_group.get(slot), "state": "deleting", "reclaimable": True}
            for slot in sorted(reclaimed) if self._done_key("copy", slot) not in fates
        ]
        return out

    def _commit_slot(self, pid: Any) -> int | None:
        """The slot that ``pid``'s commit record names now (one GET: it may have appeared since the listing)."""
        if not isinstance(pid, str):
            return None
        rec = self._storage.get(f"{C.COMMITS_PREFIX}/{pid}.json")
        return None if rec is None else int(rec.get("slot", -1))

    def reclaimed_slots(self) -> dict[int, int]:
        """slot -> pack group, for the packed slots whose per-column chunks ``gc`` deleted."""
        prefix = C.RECLAIMED_PREFIX
        return {self._number(k): int(r.get("group", -1)) for k, r in self._records(prefix).items()}

    # --- gc -----------------------------------------------------------------------------------------
    def gc(self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False) -> GcReport:
        """Reclaim the space of leaked slots, orphaned and duplicate pack groups, and the per-column copies of
        packed columns, older than ``grace_seconds`` on the storage's clock, and complete commits and
        manifests whose fate is decided (see the module docstring for the invariants that make this safe
        beside live writers, compactors and readers). Idempotent; a gc killed midway is finished by the next."""
        self._require_writable()
        report = GcReport([], [], 0, 0, [])
        left = lambda: (f"it had reclaimed {len(report.slots)} slot(s) and {len(report.groups)} group(s); each step's record "  # noqa: E731
                        "comes before its deletes, so the next `daunce gc` finishes the job; committed columns are untouched")
        with storage_errors(self.url, "gc", left):
            return self._gc(grace_seconds, dry_run, report)

    def _gc(self, grace_seconds: float, dry_run: bool, report: GcReport) -> GcReport:
        found = self.leftovers(grace_seconds, now=self._storage.clock())
        arrays = [self._train_losses] + [self._query(name)[0] for name in self.query_sets()]
        for item in found["leaked_slots"]:
            slot = item["slot"]
            if item["state"] == "commit-pending":  # invariant 4: complete the writer's decision
                record = self._decided_commit(slot)
                if not dry_run and record is not None and self._storage.put_if_absent(f"{C.COMMITS_PREFIX}/{record['perturbation']}.json", record):
                    report.completed.append(f"commit of {item['perturbation']!r} (slot {slot})")
                continue
            if not item["reclaimable"]:
                continue
            if dry_run or item["state"] == "lost-race" or self._decide_fate("slot", slot, report):
                report.slots.append(slot)
                if not dry_run:
                    for arr in arrays:
                        self._delete_column_chunks(arr, slot, report)
                    self._storage.put(self._done_key("slot", slot), {"reclaimed_at": now_iso()})
        for item in found["orphaned_groups"]:
            group = item["group"]
            if item["state"] == "manifest-missing":  # invariant 4: a published group's manifest is restored
                if not dry_run and self._complete(self._fate("group", group), "manifest", f"{C.PACKS_PREFIX}/{group:08d}.json"):
                    report.completed.append(f"manifest of pack group {group}")
                continue
            if not item["reclaimable"]:
                if item["state"] == "published-unrecorded":
                    report.skipped.append(f"pack group {group}: published, but its manifest is missing and its fate predates "
                                          "manifest copies; restore _daunce/packs/ from a copy (`daunce verify` names it)")
                continue
            if dry_run or item["state"] == "retiring" or self._decide_fate("group", group, report):
                report.groups.append(group)
                if not dry_run:
                    self._delete_group_chunks(group, report)
                    self._storage.put(self._done_key("group", group), {"reclaimed_at": now_iso()})
        for item in found["duplicate_groups"]:
            if not item["reclaimable"]:
                continue
            group = item["group"]
            if not (dry_run or self._copies_read_back(item["slots"], report, f"duplicate pack group {group}")):
                continue
            report.groups.append(group)
            if not dry_run:  # invariant 2: retired first, then the manifest (no reader picks it up), then chunks
                self._storage.put(self._fate_key("group", group, ".retired"), {"retired_at": now_iso(), "covered_by": item["covered_by"]})
                self._storage.delete(f"{C.PACKS_PREFIX}/{group:08d}.json")
                self._delete_group_chunks(group, report)
                self._storage.put(self._done_key("group", group), {"reclaimed_at": now_iso()})
        copies = [item for item in found["packed_copies"] if item["reclaimable"] and item["state"] == "packed"]
        if copies and not dry_run:
            verified = self._copies_read_back([item["slot"] for item in copies], report, "packed columns", compare_own=True)
            copies = [item for item in copies if item["slot"] in verified]
        for item in copies + [item for item in found["packed_copies"] if item["state"] == "deleting"]:
            if item["state"] == "packed":
                report.packed_slots.append(item["slot"])
            if not dry_run:  # invariant 3: the record first: from then on verify checks the packed copy only
                if item["state"] == "packed":
                    self._storage.put(f"{C.RECLAIMED_PREFIX}/{item['slot']:08d}.json", {"group": item["group"], "reclaimed_at": now_iso()})
                self._delete_column_chunks(self._train_losses, item["slot"], report)
                self._storage.put(self._done_key("copy", item["slot"]), {"reclaimed_at": now_iso()})
        return report

    def _decided_commit(self, slot: int) -> dict[str, Any] | None:
        """The commit record a slot's ``committed`` fate decided: the copy it carries, or, for a fate written by
        an older version (no copy), one rebuilt from the fate and the slot's claim (the data was complete before
        the fate: query sets are those with a chunk in the slot; the metadata is lost and says so)."""
        fate = self._fate("slot", slot) or {}
        if isinstance(fate.get("commit"), dict):
            return fate["commit"]
        claim = self._storage.get(f"{C.SLOTS_PREFIX}/{slot:08d}.json") or {}
        pid = fate.get("perturbation") or claim.get("perturbation")
        if fate.get("fate") != "committed" or not isinstance(pid, str):
            return None
        sets = [name for name in self.query_sets() if self._storage.size_of(f"{self._query(name)[0].path}/c/0/{slot}") is not None]
        return {"perturbation": pid, "slot": slot, "query_sets": sorted(sets), "worker": claim.get("worker"),
                "started_at": claim.get("claimed_at"), "committed_at": fate.get("at"), "format_version": C.FORMAT_VERSION,
                "metadata": {"rebuilt_by": "daunce gc", "why": "its writer (an older version) decided the commit and stopped "
                             "before recording it; the original metadata is lost"}}

    def _complete(self, fate: dict[str, Any] | None, field: str, key: str) -> bool:
        """Create ``key`` from the record a decided fate carries (the writer's own bytes: a writer that is
        still alive then finds its record there and succeeds). False when another record holds ``key``."""
        record = (fate or {}).get(field)
        return isinstance(record, dict) and self._storage.put_if_absent(key, record)

    def _copies_read_back(self, slots: list[int], report: GcReport, what: str, *, compare_own: bool = False) -> set[int]:
        """The slots among ``slots`` whose packed copy in their first published group reads back complete:
        every wide chunk present, passing its crc32c, finite (and, with ``compare_own``, bit-identical to the
        column's own chunks). What fails is named in ``report.skipped`` and left alone."""
        packs = self._pack_map()
        missing = [s for s in slots if s not in packs]
        if missing:
            report.skipped.append(f"{what}: slots {missing[:5]} are in no published pack group now; left alone")
        by_group: dict[int, list[int]] = {}
        for s in slots:
            if s in packs:
                by_group.setdefault(packs[s][0], []).append(s)
        good: set[int] = set()
        packed = self._packed_array() if by_group else None
        for group, members in sorted(by_group.items()):
            assert packed is not None  # by_group is not empty
            ok = set(members)
            rows, width = int(packed.chunks[0]), self.pack_width
            for r0 in range(0, self.n_train, rows):
                r1 = min(r0 + rows, self.n_train)
                self._storage.op("get", f"{packed.path}/c/{r0 // rows}/{group}")
                try:
                    copy = packed[r0:r1, group * width : (group + 1) * width]
                    own = {s: self._read_own(s, r0, r1) for s in ok} if compare_own else {}
                except (ValueError, RuntimeError, DaunceStoreError) as e:
                    report.skipped.append(f"{what}: rows {r0}:{r1} of pack group {group} or its columns do not read back ({e}); left alone")
                    ok = set()
                    break
                for s in list(ok):
                    column = copy[:, packs[s][1]]
                    if not np.isfinite(column).all() or (compare_own and not np.array_equal(column.view(np.uint32), own[s].view(np.uint32))):
                        report.skipped.append(f"{what}: slot {s}'s copy in pack group {group} does not match at rows {r0}:{r1}; left alone")
                        ok.discard(s)
            good |= ok
        return good

    def _read_own(self, slot: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of column ``slot``'s own chunks (a missing chunk reads as NaN: never equal)."""
        self._storage.op("get", f"{self._train_losses.path}/c/{r0 // int(self._train_losses.chunks[0])}/{slot}")
        return np.asarray(self._train_losses[r0:r1, slot])

    def _decide_fate(self, what: str, number: int, report: GcReport) -> bool:
        """Create ``fates/<what>-<n>`` = reclaimed; True when this gc (or an earlier, killed one) owns the
        reclaim. A writer or compactor that got there first (``committed``, ``published``) keeps it."""
        key = self._fate_key(what, number)
        if self._storage.put_if_absent(key, {"fate": "reclaimed", "at": now_iso()}):
            return True
        fate = (self._storage.get(key) or {}).get("fate")
        if fate == "reclaimed":
            return True  # a killed gc's leftovers
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
        findings += _leftover_findings(found, grace_seconds)
        findings += self._check_matrices(checked)
        for key in self.stray_records():
            findings.append(Finding("note", "stray-record", key, f"{key!r} is not a record daunce-store writes; it is ignored (delete it if nothing of yours needs it)"))
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

    def _check_matrices(self, checked: dict[str, int]) -> Iterator[Finding]:
        """The persisted K x K matrices (``_derived``): each whole and named by its key. A damaged one is
        never used (readers recompute), but it is damage all the same."""
        for key in self._storage.list(C.MATRICES_PREFIX):
            checked["records"] += 1
            try:
                record = self._storage.get(key)
                problem = None if record is None else derived_matrix_problem(key, record)
            except CorruptRecordError as e:
                problem = str(e)
            if problem:
                yield Finding("damage", "matrix", key, f"the derived matrix {key!r} is damaged: {problem}. Scoring ignores it and "
                                                       "recomputes the matrix; delete it (the next writable scoring call writes it again)")
        # The -corr measures' row scales: each record whole, named by its key, and naming whole bytes (the
        # .f32 objects are checked through the records; one no record names is a killed writer's, unused).
        for key in self._storage.list(C.SCALES_PREFIX):
            if not key.endswith(".json"):
                continue
            checked["records"] += 1
            try:
                record = self._storage.get(key)
                sha = (record or {}).get("sha256")
                data = self._storage.get_bytes(f"{C.SCALES_PREFIX}/{record['kind']}/{sha}.f32") \
                    if record is not None and isinstance(sha, str) and isinstance(record.get("kind"), str) else None
                problem = None if record is None else row_scales_problem(key, record, data)
            except CorruptRecordError as e:
                problem = str(e)
            if problem:
                yield Finding("damage", "row-scales", key, f"the row scales {key!r} are damaged: {problem}. Scoring ignores them and "
                                                           "scores without; delete the record (the next writable scoring call writes it again)")

    def _check_ids(self, checked: dict[str, int]) -> Iterator[Finding]:
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
                elif values.size and float(np.abs(values).max()) > C.MAX_ABS_LOSS:
                    yield Finding("damage", "chunk", key, f"chunk {key!r} of committed column {col} holds |loss| up to "
                                  f"{float(np.abs(values).max()):.3g}, beyond {C.MAX_ABS_LOSS:.0e} (a diverged fine-tune, written "
                                  "before appends checked it): its statistics overflow float32; rerun that perturbation into a new store")

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


def _slot_state(fate: dict[str, Any] | None, commit_slot: int | None, slot: int) -> tuple[str, bool]:
    """What a claimed slot without a (listed) commit is, and whether gc acts on it regardless of age:
    ``committed`` (its commit record names it), ``undecided`` (no fate: its writer died before deciding, or
    is still writing: reclaimable once old), ``reclaiming`` (gc's fate: a killed gc's work to finish),
    ``commit-pending`` (decided committed, commit record not yet created: gc completes it),
    ``lost-race`` (its perturbation's commit names another slot: it can never become visible). A slot with
    no fate that a manifest or reclaimed record names is ``unrecorded`` (set by the caller): committed, its
    record lost, never deleted."""
    if commit_slot == slot:
        return "committed", False
    decided = (fate or {}).get("fate")
    if decided is None:
        return "undecided", False
    if decided == "reclaimed":
        return "reclaiming", True
    if commit_slot is not None:
        return "lost-race", True
    return "commit-pending", True  # gc creates the commit record (from the fate's copy, or rebuilt: older fates)


def _group_state(fate: dict[str, Any] | None, retired: bool) -> tuple[str, bool]:
    """What a claimed pack group without a manifest is: ``undecided`` (no fate: reclaimable once old),
    ``reclaiming`` (gc's fate), ``retiring`` (a duplicate gc retired: its chunks go), ``manifest-missing``
    (published; gc restores the manifest its fate carries), ``published-unrecorded`` (published by an older
    version whose fate has no manifest copy: damage, never deleted)."""
    decided = (fate or {}).get("fate")
    if decided is None:
        return "undecided", False
    if decided == "reclaimed":
        return "reclaiming", True
    if retired:
        return "retiring", True
    if isinstance((fate or {}).get("manifest"), dict):
        return "manifest-missing", True
    return "published-unrecorded", False


def _leftover_findings(found: dict[str, list[dict[str, Any]]], grace_seconds: float) -> Iterator[Finding]:
    """verify's findings for what :meth:`MaintenanceMixin.leftovers` found."""
    for item in found.get("leaked_slots", []):
        key, slot, pid = f"{C.SLOTS_PREFIX}/{item['slot']:08d}.json", item["slot"], item["perturbation"]
        state = item["state"]
        if state == "unrecorded":
            yield Finding("damage", "missing-commit", key, f"slot {slot} holds a column of {pid!r} decided committed (its fate or a "
                          "pack manifest says so), but its commit record is missing (lost, or its writer, an older version, "
                          f"stopped right before it) and cannot be rebuilt; restore _daunce/commits/{pid}.json from a copy "
                          "(`daunce gc` never deletes the slot)")
        elif state == "commit-pending":
            yield Finding("reclaimable", "commit-pending", key, f"slot {slot} holds the complete column of {pid!r}, decided committed by "
                          f"{item['worker']}, which stopped before its commit record; `daunce gc` creates that record")
        elif state == "lost-race":
            yield Finding("reclaimable", "leaked-slot", key, f"slot {slot} was written by {item['worker']} for {pid!r}, which another "
                          "worker committed first; `daunce gc` reclaims it")
        else:
            yield Finding("reclaimable" if item["reclaimable"] else "note", "leaked-slot", key,
                          f"slot {slot} was claimed by {item['worker']} for {pid!r} at {item['claimed_at']} and never committed "
                          f"({'`daunce gc` reclaims it' if item['reclaimable'] else 'possibly still being written'})")
    for item in found.get("orphaned_groups", []):
        key, group, state = f"{C.PACK_CLAIMS_PREFIX}/{item['group']:08d}.json", item["group"], item["state"]
        if state in ("manifest-missing", "published-unrecorded"):
            in_flight = item["age"] <= grace_seconds
            fix = ("`daunce gc` restores it from the copy its fate record carries" if state == "manifest-missing"
                   else "restore it from a copy of the store; `daunce gc` never deletes the group")
            yield Finding("note" if in_flight else "damage", "missing-manifest", f"{C.PACKS_PREFIX}/{group:08d}.json",
                          f"pack group {group} was published, but its manifest is missing"
                          + (" (its compactor may be writing it now)" if in_flight else f"; {fix}"))
        else:
            yield Finding("reclaimable" if item["reclaimable"] else "note", "orphaned-group", key,
                          f"pack group {group} was claimed by {item['worker']} and never published")
    for item in found.get("duplicate_groups", []):
        yield Finding("reclaimable" if item["reclaimable"] else "note", "duplicate-group", f"{C.PACKS_PREFIX}/{item['group']:08d}.json",
                      f"pack group {item['group']} repeats columns of group(s) {item['covered_by']} (two compactors raced)")
