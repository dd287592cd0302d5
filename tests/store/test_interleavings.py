"""Interleavings explored, not sampled by the clock: one ``gc(grace_seconds=0)``, one ``compact`` and one
``append`` run against a store holding every kind of leftover (a leaked slot, a slot decided committed whose
writer died before its commit record, an orphaned pack claim, duplicate pack groups, packed columns with
their own chunks), one storage operation at a time, in thousands of seeded systematic schedules (random walks
and PCT). After each: every committed column reads back bit-identical, ``verify`` finds no damage, the
append's outcome matches what is visible, and a final gc leaves a clean store.

Two kinds of schedule: every schedule with at most one preemption (exhaustive at that bound), and
``DAUNCE_SCHEDULES`` seeded random-walk and PCT schedules each (default 150).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from _schedule import OnePreemption, Picker, run_schedule
from _support import Location, assert_consistent, column, fill
from daunce_store import _constants as C
from daunce_store import errors
from daunce_store.store._records import now_iso

N, M = 16, 4  # two row chunks: every chunk step happens twice, at a third fewer schedules than three
SCHEDULES = int(os.environ.get("DAUNCE_SCHEDULES", "150"))
HORIZON = 170  # about the steps of one schedule: PCT's priority changes fall inside it
# Every committed column of the template; besides, p6 is decided committed (its writer "died" before its
# commit record: gc completes it), and p5 leaked (its writer died before deciding).
TEMPLATE_COLUMNS = [0, 1, 2, 3]  # p2 and p3 unpacked: the compactor always has a group to pack


def build_template(root: Path) -> Location:
    location = Location("local", str(root), None)
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]},
                      chunk_rows=8, capacity=64, pack_width=2)
    fill(s, TEMPLATE_COLUMNS[:2])
    first, late = location.open(), location.open()
    assert first.compact() == [0]  # slots 0-1
    late._pack_map = lambda: {}  # type: ignore[method-assign]  # a compactor that planned before it published
    assert late.compact() == [1]  # a duplicate of group 0
    fill(s, TEMPLATE_COLUMNS[2:])
    # A leaked slot: claimed and written, its writer killed before deciding.
    leaked = s._claim_slot("p5", "killed-writer")
    s._write_column(s._train_losses, leaked, column(5, N))
    # A slot decided committed whose writer was killed before its commit record.
    pending = s._claim_slot("p6", "killed-writer")
    s._write_column(s._train_losses, pending, column(6, N))
    s._write_column(s._query("test")[0], pending, column(6, M, salt=1))
    record = {"perturbation": "p6", "slot": pending, "query_sets": ["test"], "worker": "killed-writer", "started_at": now_iso(),
              "committed_at": now_iso(), "format_version": C.FORMAT_VERSION, "metadata": {"seed": 6}}
    assert s._storage.put_if_absent(f"{C.FATES_PREFIX}/slot-{pending:08d}.json",
                                    {"fate": "committed", "perturbation": "p6", "at": now_iso(), "commit": record})
    # An orphaned pack claim: a compactor killed while writing group 2's chunks.
    s._storage.put_if_absent(f"{C.PACK_CLAIMS_PREFIX}/00000002.json", {"slots": [2, pending], "worker": "killed-compactor", "claimed_at": now_iso()})
    s._packed_array()[0:8, 4:6] = np.ones((8, 2), dtype=np.float32)
    return location


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template")
    build_template(root)
    return root


def explore(template: Path, work: Path, pick, where: str) -> list[tuple[str, str, str]]:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template, work)
    location = Location("local", str(work), None)
    appender, compactor, collector = location.open(), location.open(), location.open()
    actors = {
        "append": (appender._storage, lambda: appender.append("p7", column(7, N), {"test": column(7, M, salt=1)}, metadata={"seed": 7})),
        "compact": (compactor._storage, compactor.compact),
        "gc": (collector._storage, lambda: collector.gc(grace_seconds=0)),
    }
    outcomes, trace = run_schedule(actors, pick)
    where = f"{where} ({len(trace)} steps)"
    # gc never fails; append and compact either succeed or fail loudly with the errors that say why.
    assert not isinstance(outcomes["gc"], BaseException), (where, outcomes["gc"])
    assert not isinstance(outcomes["append"], BaseException) or isinstance(outcomes["append"], errors.ReclaimedError), (where, outcomes["append"])
    assert not isinstance(outcomes["compact"], BaseException) or isinstance(
        outcomes["compact"], (errors.ReclaimedError, errors.CorruptChunkError)), (where, outcomes["compact"])
    store = location.open()
    report = store.verify()
    assert report.ok, (where, [f for f in report.findings if f.kind == "damage"], trace)
    committed = assert_consistent(store)
    expected = set(TEMPLATE_COLUMNS) | ({7} if not isinstance(outcomes["append"], BaseException) else set())
    assert expected <= set(committed) <= expected | {6}, (where, committed)
    # What any schedule left, the next gc finishes: p6 is committed, and nothing reclaimable or damaged remains.
    store.gc(grace_seconds=0)
    again = location.open()
    assert set(assert_consistent(again)) == expected | {6}, where
    final = again.verify()
    assert final.ok and final.count("reclaimable") == 0, (where, final.findings)
    return trace


ACTORS = ["append", "compact", "gc"]


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_gc_compact_append_seeded_schedules(template: Path, tmp_path: Path, strategy: str) -> None:
    distinct: set[tuple[tuple[str, str, str], ...]] = set()
    for seed in range(SCHEDULES):
        pick = Picker(strategy, seed, ACTORS, horizon=HORIZON)
        distinct.add(tuple(explore(template, tmp_path / "s", pick, f"{strategy} schedule {seed}")))
    # The schedules really differ (a scheduler that ignored its choices would run one interleaving).
    assert len(distinct) > SCHEDULES // 2, len(distinct)


def test_gc_compact_append_every_one_preemption_schedule(template: Path, tmp_path: Path) -> None:
    """Every schedule with at most one preemption: each order of the three actors, preempted at each step
    for each other actor (exhaustive at that bound)."""
    import itertools

    explored = 0
    for order in itertools.permutations(ACTORS):
        plain = explore(template, tmp_path / "s", OnePreemption(list(order)), f"order {order}")
        explored += 1
        for at, (running, _, _) in enumerate(plain):
            for to in ACTORS:
                if to != running:  # switching to the actor that runs there anyway is the plain schedule
                    explore(template, tmp_path / "s", OnePreemption(list(order), at, to), f"order {order}, preempted at {at} for {to}")
                    explored += 1
    assert explored > 6 * 100, explored  # the three actors take dozens of storage operations each


def test_template_holds_every_leftover(tmp_path: Path) -> None:
    """The explored store is adversarial: each kind of leftover is there for gc to act on."""
    s = build_template(tmp_path).open()
    found = s.leftovers(0)
    assert {i["state"] for i in found["leaked_slots"]} == {"undecided", "commit-pending"}
    assert [i["state"] for i in found["orphaned_groups"]] == ["undecided"]
    assert [i["group"] for i in found["duplicate_groups"]] == [1]
    assert [i["slot"] for i in found["packed_copies"]] == [0, 1]


