"""Crash injection: a real writer process is SIGKILLed at random points while appending; after every
kill the store opens, every committed column reads back bit-identical, nothing partial is visible, and
the killed perturbation can be appended again."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from _support import BUCKET, Location, assert_consistent, column

pytestmark = pytest.mark.slow

WRITER = Path(__file__).with_name("_crash_writer.py")
N, M = 1024, 64
CHUNK_ROWS = 32  # 32 train chunks + 2 query chunks per append: many separate writes to land a kill in


def _start_writer(location: Location, start: int, compact: bool) -> subprocess.Popen[str]:
    options = [json.dumps(location.options)] if location.options else []
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), location.url(), str(start), "compact" if compact else "append", *options],
        stdout=subprocess.PIPE, text=True, cwd=WRITER.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the writer opened the store (imports take a while)
    assert line.strip() == "ready", f"writer failed to start: {line!r}"
    return proc


@pytest.mark.parametrize(
    "backend, compact, trials",
    [("local", False, 50), ("local", True, 24), pytest.param("s3", False, 8, marks=pytest.mark.s3)],
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
    max_delay = 0.1 if backend == "local" else 0.6  # an S3 append is a few hundred ms against moto
    rng = random.Random(1234)
    next_pid = 0
    killed_mid_append = 0

    def killed_mid_compaction() -> bool:  # a claimed group that never got its manifest
        s = location.open(mode="r")
        return len(s._storage.list("_daunce/pack-claims")) > len(s._storage.list("_daunce/packs"))

    trial = 0
    # With compaction, go on (up to 3x the trials) until a kill has landed inside one: its window is short.
    while trial < trials or (compact and trial < 3 * trials and not killed_mid_compaction()):
        trial += 1
        proc = _start_writer(location, next_pid, compact)
        if compact and trial % 2 == 0:
            # Aim at a compaction: its window (claim .. manifest) is a few ms, and on a quiet machine random
            # delays alone can miss it for dozens of trials. One call in four packs a group.
            for _ in range(rng.randint(1, 4)):
                assert proc.stdout is not None and proc.stdout.readline().strip() == "compacting"
            time.sleep(rng.uniform(0.0, 0.005))
        else:
            # One append takes ~20 ms here; delays up to a few appends land kills everywhere in the cycle
            # (slot claim, chunk writes, commit record) and sometimes before the first one.
            time.sleep(rng.uniform(0.0, max_delay))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL

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
            reopened.compact()
            packed = reopened._pack_map()
            assert len(packed) == 4 * ((killed + 1) // 4) and set(packed) <= {c.slot for c in reopened.commits()}
            assert assert_consistent(location.open(mode="r")) == list(range(killed + 1))
        next_pid = killed + 1
    # The kills did land inside appends (not only between them), so the test exercised something.
    assert killed_mid_append >= trials // 5, killed_mid_append
    if compact:  # kills landed in compactions too: claimed groups that never got a manifest
        assert killed_mid_compaction()
