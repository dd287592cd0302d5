"""Crash injection: a real writer process is SIGKILLed at named failpoints (the N-th storage operation, N
spread over an append's and a compaction's operations) while appending; after every
kill the store opens, every committed column reads back bit-identical, nothing partial is visible, and
the killed perturbation can be appended again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from _support import BUCKET, Location, assert_consistent, column
from daunce_store.store._failpoints import FAILPOINT_ENV, TRACE_ENV

pytestmark = pytest.mark.slow

WRITER = Path(__file__).with_name("_crash_writer.py")
N, M = 1024, 64
CHUNK_ROWS = 32  # 32 train chunks + 2 query chunks per append: many separate writes to land a kill in


APPEND_TARGETS = [("put", "_daunce/slots/*"), ("put", "train/losses/*"), ("put", "_daunce/fates/*"), ("put", "_daunce/commits/*"),
                  ("any", "*")]


def _start_writer(location: Location, start: int, compact: bool, *, failpoint: str | None = None, trace: Path | None = None,
                  cycles: int = 0) -> subprocess.Popen[str]:
    options = [json.dumps(location.options)] if location.options else []
    env = {k: v for k, v in os.environ.items() if k not in (FAILPOINT_ENV, TRACE_ENV)}
    env.update({FAILPOINT_ENV: failpoint} if failpoint else {})
    env.update({TRACE_ENV: str(trace)} if trace else {})
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), location.url(), str(start), "compact" if compact else "append", str(cycles), *options],
        stdout=subprocess.PIPE, text=True, cwd=WRITER.parent, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the writer opened the store (imports take a while)
    assert line.strip() == "ready", f"writer failed to start: {line!r}"
    return proc


@pytest.mark.parametrize(
    "backend, compact, trials",
    [("local", False, 40), ("local", True, 24), pytest.param("s3", False, 8, marks=pytest.mark.s3)],
    ids=["local-append", "local-append+compact", "s3-append"],
)
def test_sigkill_during_append_never_exposes_partial_columns(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, compact: bool, trials: int
) -> None:
    if backend == "local":
        location = Location("local", str(tmp_path), None)
    else:  # S3 over loopback: a killed writer leaves half-sent requests, which S3 never stores
        location = Location("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}", request.getfixturevalue("s3_endpoint"))
    location.init(
        "s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=CHUNK_ROWS, capacity=1024,
        pack_width=4,  # with compaction on: a group of 4 columns (32 wide chunks) after every 4th append
    )
    # Aim, don't sleep: count the storage operations of the writer's first cycles (4 with compaction, so one
    # packs a group), then kill each trial before a named operation: each write of an append in turn, or
    # any operation spread over them (with compaction, every other trial before an operation on a pack
    # record or chunk).
    ops = tmp_path / "ops.txt"
    probe = _start_writer(location, 0, compact, trace=ops, cycles=4 if compact else 1)
    assert probe.wait() == 0
    traced = ops.read_text().splitlines()
    pack_ops = [line for line in traced if "pack" in line]
    assert len(traced) > N // CHUNK_ROWS and (not compact or len(pack_ops) > N // CHUNK_ROWS), (len(traced), len(pack_ops))
    next_pid = 1 if not compact else 4
    killed_mid_append = 0
    killed_before: set[str] = set()

    def killed_mid_compaction() -> bool:  # a claimed group that never got its manifest
        s = location.open(mode="r")
        return len(s._storage.list("_daunce/pack-claims")) > len(s._storage.list("_daunce/packs"))

    compaction_kills = 0
    for trial in range(trials):
        if compact and trial % 2:
            failpoint = f"kill@any:{1 + (trial // 2 * 7) % len(pack_ops)}:*pack*"
        else:  # before each write of an append in turn (the claim, a chunk, the fate, the commit), or any op
            kind, glob = APPEND_TARGETS[trial % len(APPEND_TARGETS)]
            spread = {"train/losses/*": N // CHUNK_ROWS, "*": len(traced)}.get(glob, 1)
            failpoint = f"kill@{kind}:{1 + (trial // len(APPEND_TARGETS) * 7) % spread}:{glob}"
        ops.unlink(missing_ok=True)
        proc = _start_writer(location, next_pid, compact, failpoint=failpoint, trace=ops)
        assert proc.wait() == -signal.SIGKILL, failpoint  # the writer loops forever: only the failpoint ends it
        last = ops.read_text().splitlines()[-1]  # the operation it was killed before
        killed_before.add(last.split(" ", 1)[1].rsplit("/", 1)[0].split("/c/")[0])

        reopened = location.open()
        committed = assert_consistent(reopened)
        # The writer commits in order, so its committed ids are a prefix; the next was in flight.
        assert committed == list(range(len(committed)))
        assert len(committed) >= next_pid
        killed = len(committed)
        if len(reopened._storage.list("_daunce/slots")) > killed:
            killed_mid_append += 1  # it had claimed a slot for `killed` (and maybe written chunks)
        assert not reopened.is_committed(f"p{killed}")
        # The killed perturbation can be appended again, by anyone, and reads back right.
        reopened.append(f"p{killed}", column(killed, N), {"test": column(killed, M, salt=1)})
        again = location.open(mode="r")
        assert again.num_columns() == killed + 1
        slot = {c.perturbation: c.slot for c in again.commits()}[f"p{killed}"]
        assert (again.train_losses(slots=[slot])[:, 0] == column(killed, N)).all()
        if compact:  # compaction after a killed compaction packs the rest, and reads stay right
            compaction_kills += killed_mid_compaction()
            reopened.compact()
            packed = reopened._pack_map()
            assert len(packed) == 4 * ((killed + 1) // 4) and set(packed) <= {c.slot for c in reopened.commits()}
            assert assert_consistent(location.open(mode="r")) == list(range(killed + 1))
        next_pid = killed + 1
    # The kills landed inside appends (not only between them), before every kind of write, and (with
    # compaction) inside compactions: a claimed group that never got its manifest.
    assert killed_mid_append >= trials // 5, killed_mid_append
    aimed = {"train/losses", "train/packed", "_daunce/packs"} if compact else {"_daunce/slots", "train/losses", "_daunce/fates", "_daunce/commits"}
    assert aimed <= killed_before, killed_before
    if compact:
        assert compaction_kills >= 2, compaction_kills
