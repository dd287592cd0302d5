"""Crash injection: a real writer process is SIGKILLed at random points while appending; after every
kill the store opens, every committed column reads back bit-identical, nothing partial is visible, and
the killed perturbation can be appended again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import daunce_store
from _support import assert_consistent, column

pytestmark = pytest.mark.slow

WRITER = Path(__file__).with_name("_crash_writer.py")
N, M = 1024, 64
CHUNK_ROWS = 32  # 32 train chunks + 2 query chunks per append: many separate writes to land a kill in


def _start_writer(url: str, start: int, compact: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), url, str(start), *(["compact"] if compact else [])],
        stdout=subprocess.PIPE, text=True, cwd=WRITER.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the writer opened the store (imports take a while)
    assert line.strip() == "ready", f"writer failed to start: {line!r}"
    return proc


@pytest.mark.parametrize("compact, trials", [(False, 50), (True, 24)], ids=["append", "append+compact"])
def test_sigkill_during_append_never_exposes_partial_columns(tmp_path: Path, compact: bool, trials: int) -> None:
    url = str(tmp_path / "s.zarr")
    daunce_store.init(
        url, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=CHUNK_ROWS, capacity=1024,
        pack_width=4,  # with compaction on: a group of 4 columns (32 wide chunks) after every 4th append
    )
    rng = random.Random(1234)
    next_pid = 0
    killed_mid_append = 0
    for trial in range(trials):
        proc = _start_writer(url, next_pid, compact)
        # One append takes ~20 ms here; delays up to a few appends land kills everywhere in the cycle
        # (slot claim, chunk writes, commit record) and sometimes before the first one.
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL

        reopened = daunce_store.open(url)
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
        again = daunce_store.open(url, mode="r")
        assert again.num_columns() == killed + 1
        slot = {c.perturbation: c.slot for c in again.commits()}[f"p{killed}"]
        assert (again.train_losses(columns=[slot])[:, 0] == column(killed, N)).all()
        if compact:  # compaction after a killed compaction packs the rest, and reads stay right
            reopened.compact()
            packed = reopened._pack_map()
            assert len(packed) == 4 * ((killed + 1) // 4) and set(packed) <= {c.slot for c in reopened.commits()}
            assert assert_consistent(daunce_store.open(url, mode="r")) == list(range(killed + 1))
        next_pid = killed + 1
    # The kills did land inside appends (not only between them), so the test exercised something.
    assert killed_mid_append >= trials // 5, killed_mid_append
    if compact:  # kills landed in compactions too: claimed groups that never got a manifest
        store = daunce_store.open(url, mode="r")
        assert len(store._storage.list("_daunce/pack-claims")) > len(store._storage.list("_daunce/packs"))
