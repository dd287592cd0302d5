"""gc never loses a committed column: the three ways it used to (beside a live compaction, a missing manifest,
a clock running ahead), and crashes and pauses aimed at named failpoints (the N-th storage operation), never
at a moment chosen by sleeping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _support import Location, assert_consistent, column, fill
from daunce_store import _constants as C
from daunce_store.store._failpoints import FAILPOINT_ENV, TRACE_ENV, parse_failpoint

N, M = 48, 4
HERE = Path(__file__).parent

ACT = """
import json, sys, daunce_store
from _support import column
url, what = sys.argv[1], sys.argv[2]
store = daunce_store.open(url)
if what == "gc":
    r = store.gc(**({"grace_seconds": float(sys.argv[3])} if len(sys.argv) > 3 else {}))
    print(json.dumps({"slots": r.slots, "groups": r.groups, "packed": r.packed_slots, "completed": r.completed, "skipped": r.skipped}))
elif what == "append":
    k = int(sys.argv[3])
    store.append(f"p{k}", column(k, store.n_train), {"test": column(k, store.query_sets()["test"], salt=1)}, metadata={"seed": k})
    print("committed")
elif what == "compact":
    print(json.dumps(store.compact()))
"""


def _act(location: Location, *args: str, failpoint: str | None = None, trace: Path | None = None,
         prefix: list[str] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in (FAILPOINT_ENV, TRACE_ENV)}
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    if trace:
        env[TRACE_ENV] = str(trace)
    return subprocess.Popen([*(prefix or []), sys.executable, "-c", ACT, location.url(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, env=env)


def _wait_stopped(proc: subprocess.Popen[str]) -> None:
    """Block until ``proc`` stops itself at its ``pause`` failpoint (waitpid's WUNTRACED: no polling, no sleep)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the process exited instead of pausing (status {status}): {proc.stderr.read() if proc.stderr else ''}"


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


def _store(location: Location, **kwargs):
    kwargs = {"chunk_rows": 16, "capacity": 64, "pack_width": 2, **kwargs}
    return location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, **kwargs)


def test_failpoint_spec_is_checked() -> None:
    assert parse_failpoint("kill@put:3:_daunce/fates/*") == ("kill", "put", 3, "_daunce/fates/*")
    for bad in ("kill", "boom@put:1", "kill@write:1", "kill@put:0", "kill@put:x"):
        with pytest.raises(ValueError, match="DAUNCE_STORE_FAILPOINT"):
            parse_failpoint(bad)


def test_missing_manifest_is_damage_never_a_licence(tmp_path: Path) -> None:
    """The adversary's case 2: compact, gc (the per-column copies go), move a manifest aside, gc again. gc
    restores the manifest from the group's fate instead of deleting the group; putting the moved manifest
    back changes nothing."""
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(4))
    assert s.compact() == [0, 1]
    assert s.gc(grace_seconds=0).packed_slots == [0, 1, 2, 3]
    manifest = tmp_path / "s.zarr" / C.PACKS_PREFIX / "00000000.json"
    aside = tmp_path / "aside.json"
    shutil.move(manifest, aside)
    report = location.open().verify(grace_seconds=0)
    assert not report.ok
    assert any(f.what == "missing-manifest" and f.kind == "damage" and "restores it" in f.message for f in report.findings), report.findings
    before = {k: v for k, v in location.objects().items() if k.startswith("train/packed/")}
    gc = location.open().gc(grace_seconds=0)
    assert gc.groups == [] and gc.completed == ["manifest of pack group 0"], gc
    assert {k: v for k, v in location.objects().items() if k.startswith("train/packed/")} == before  # no chunk went
    assert json.loads(manifest.read_bytes()) == json.loads(aside.read_bytes())
    shutil.move(aside, manifest)  # the user puts it back: the same bytes
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    assert location.open().verify().findings == []


def test_missing_manifest_of_an_older_format_is_never_deleted(tmp_path: Path) -> None:
    """A published fate written before fates carried the manifest cannot be completed: damage, left alone."""
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(2))
    assert s.compact() == [0]
    fate = tmp_path / "s.zarr" / C.FATES_PREFIX / "group-00000000.json"
    fate.write_text(json.dumps({"fate": "published", "at": "2026-01-01T00:00:00+00:00"}))
    (tmp_path / "s.zarr" / C.PACKS_PREFIX / "00000000.json").unlink()
    packed = {k: v for k, v in location.objects().items() if k.startswith("train/packed/")}
    report = location.open().gc(grace_seconds=0)
    assert report.groups == [] and any("manifest is missing" in s for s in report.skipped), report
    assert {k: v for k, v in location.objects().items() if k.startswith("train/packed/")} == packed
    assert any(f.what == "missing-manifest" and f.kind == "damage" for f in location.open().verify(grace_seconds=0).findings)


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs Debian's faketime (.ci/run installs it)")
def test_gc_on_a_host_whose_clock_runs_two_hours_ahead(tmp_path: Path) -> None:
    """The adversary's case 3, with real processes: a writer paused between its chunks and its fate, a
    compactor paused between its group's chunks and its fate, and freshly packed columns; gc runs with the
    default grace (1 h) on a clock 2 h ahead (libfaketime). Ages come from the storage's clock, so nothing
    young looks old: gc takes nothing, and both paused processes then finish."""
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(4))
    assert s.compact() == [0, 1]  # fresh manifests: their columns' own chunks are not yet reclaimable
    writer = _act(location, "append", "4", failpoint=f"pause@put:1:{C.FATES_PREFIX}/*")
    _wait_stopped(writer)
    fill(s, [5, 6])
    compactor = _act(location, "compact", failpoint=f"pause@put:1:{C.FATES_PREFIX}/*")
    _wait_stopped(compactor)
    objects = location.objects()
    gc = _act(location, "gc", prefix=["faketime", "-f", "+2h"])
    result = json.loads(_finish(gc))
    assert result["slots"] == result["groups"] == result["packed"] == [], result
    assert location.objects() == objects  # gc wrote and removed only its clock probe
    for proc in (writer, compactor):
        os.kill(proc.pid, signal.SIGCONT)
    assert _finish(writer).strip() == "committed"
    assert json.loads(_finish(compactor)) == [2]
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3, 4, 5, 6]
    assert location.open().verify().ok


def test_gc_beside_a_compactor_paused_at_each_step(tmp_path: Path) -> None:
    """The adversary's case 1, aimed: a compactor paused before each of its storage operations in turn while
    gc(grace_seconds=0) runs to the end; then it resumes. Every committed column reads back, verify is clean."""
    template = tmp_path / "template"
    t = _store(Location("local", str(template), None))
    fill(t, range(2))
    probe = Location("local", str(tmp_path / "probe"), None)
    shutil.copytree(template, tmp_path / "probe")
    ops = tmp_path / "ops.txt"
    _finish(_act(probe, "compact", trace=ops))
    total = len(ops.read_text().splitlines())
    assert total > 10
    for n in range(1, total + 1):
        work = tmp_path / f"w{n}"
        shutil.copytree(template, work)
        location = Location("local", str(work), None)
        compactor = _act(location, "compact", failpoint=f"pause@any:{n}")
        _wait_stopped(compactor)
        location.open().gc(grace_seconds=0)
        os.kill(compactor.pid, signal.SIGCONT)
        _, err = compactor.communicate()
        # It publishes, or loses its group to gc loudly (gc took the claim for orphaned, or the column's own
        # chunks went from under its read): never a traceback of another kind.
        assert compactor.returncode == 0 or "ReclaimedError" in err or "CorruptChunkError" in err, (n, err)
        store = location.open()
        assert store.verify().ok, (n, store.verify().findings)
        store.gc(grace_seconds=0)
        assert assert_consistent(location.open(mode="r")) == [0, 1], n
        assert location.open().verify().ok, n
        shutil.rmtree(work)


def _leak_slot(store, pid: int) -> int:
    slot = store._claim_slot(f"p{pid}", "killed-writer")
    store._write_column(store._train_losses, slot, column(pid, store.n_train))
    return slot


def test_sigkill_during_gc_at_every_kind_of_step(tmp_path: Path) -> None:
    """gc killed (SIGKILL) before its k-th storage operation, for k spread over all of its operations: committed
    columns stay intact, and the next gc finishes the job. Replaces kills timed by random sleeps, which
    missed gc entirely on a fast or loaded machine."""
    template = tmp_path / "template"
    base = Location("local", str(template), None)
    s = _store(base, chunk_rows=8)
    fill(s, range(3))
    assert s.compact() == [0]  # slots 0 and 1 packed: their per-column copies are reclaimed too
    leaked = [_leak_slot(s, 100 + i) for i in range(4)]
    ops = tmp_path / "ops.txt"
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    _finish(_act(Location("local", str(probe), None), "gc", "0", trace=ops))
    kinds = [line.split(" ", 1)[0] for line in ops.read_text().splitlines()]
    deletes = [i + 1 for i, k in enumerate(kinds) if k == "delete"]
    puts = [i + 1 for i, k in enumerate(kinds) if k == "put"]
    assert len(deletes) > 20 and puts
    # Every put (records: fates, done, reclaimed) and every third delete (chunks), as op numbers.
    targets = sorted(set(puts) | set(deletes[::3]))
    for n in targets:
        work = tmp_path / "w"
        shutil.copytree(template, work)
        location = Location("local", str(work), None)
        proc = _act(location, "gc", "0", failpoint=f"kill@any:{n}")
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode)
        assert assert_consistent(location.open(mode="r")) == [0, 1, 2], n
        location.open().gc(grace_seconds=0)
        again = location.open()
        assert again.status()["leaked_slots"] == [] and again.reclaimed_slots() == {0: 0, 1: 0}, n
        chunk_columns = {int(k.rsplit("/", 1)[1]) for k in location.objects() if k.startswith("train/losses/c/")}
        assert chunk_columns == {2} and chunk_columns.isdisjoint(leaked), (n, chunk_columns)
        assert again.verify().findings == [], (n, again.verify().findings)
        shutil.rmtree(work)


def _age(root: Path, seconds: float) -> None:
    """Make every record look written ``seconds`` ago (on the storage's clock: file modification times)."""
    for path in (root / "_daunce").rglob("*"):
        if path.is_file():
            stat = path.stat()
            os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))


@pytest.mark.parametrize("layout", ["older-fate", "no-fate-but-packed"])
def test_a_missing_commit_record_is_never_a_licence(tmp_path: Path, layout: str) -> None:
    """A committed column whose commit record went missing, in a store written two hours ago: with a fate
    from an older version (no copy of the commit inside: gc rebuilds the record), or with no fate at all but
    named by a pack manifest (verify calls it damage). gc deletes nothing of it either way; the original
    record put back, all is well."""
    location = Location("local", str(tmp_path), None)
    s = _store(location)
    fill(s, range(4))
    root = tmp_path / "s.zarr"
    slot = {c.perturbation: c.slot for c in s.commits()}["p1"]
    fate = root / C.FATES_PREFIX / f"slot-{slot:08d}.json"
    if layout == "older-fate":
        fate.write_text(json.dumps({"fate": "committed", "perturbation": "p1", "at": "2026-12-02T10:00:00+00:00"}))
    else:
        assert s.compact() == [0, 1]
        fate.unlink()
    _age(root, 7200)
    commit, aside = root / C.COMMITS_PREFIX / "p1.json", tmp_path / "p1.aside"
    shutil.move(commit, aside)
    def its_chunks() -> dict[str, bytes]:  # p1's own chunks and every packed chunk (other slots' own copies may go)
        return {k: v for k, v in location.objects().items() if k.endswith(f"/{slot}") or k.startswith("train/packed/")}

    chunks = its_chunks()
    assert chunks
    found = location.open().verify()
    if layout == "older-fate":  # decided committed: gc rebuilds the record (the writer may have died right there)
        assert any(f.what == "commit-pending" for f in found.findings), found.findings
    else:
        assert any(f.what == "missing-commit" and f.kind == "damage" for f in found.findings), found.findings
    report = location.open().gc()
    assert report.slots == [], report
    assert its_chunks() == chunks
    if layout == "older-fate":
        assert report.completed == ["commit of 'p1' (slot 1)"], report
        rebuilt = json.loads(commit.read_text())
        assert rebuilt["query_sets"] == ["test"] and rebuilt["metadata"]["rebuilt_by"] == "daunce gc"
        assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    shutil.move(aside, commit)  # the original record, put back, replaces the rebuilt one
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    assert location.open().verify().ok
