"""A full disk or a failing one ends init, append, compact and gc with one line naming the store, the
operation and what was left, never a raw ``OSError [Errno 28]`` traceback, and loses nothing committed. A real
full disk (a small tmpfs, where this user may mount one) and the same errors raised at named failpoints (the
N-th storage operation) on an ordinary disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import daunce_store
from _support import Location, assert_consistent, column, fill
from daunce_store import errors
from daunce_store.store._failpoints import FAILPOINT_ENV

N, M = 64, 4
DAUNCE = [sys.executable, "-c", "from daunce_store.cli import app; app()"]


def _daunce(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    env["COLUMNS"] = "80"  # a narrow terminal: the error must still be one line
    return subprocess.run([*DAUNCE, *args], capture_output=True, text=True, env=env)


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def ids(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text("".join(f"t{i}\n" for i in range(N)))
    (tmp_path / "test.txt").write_text("".join(f"q{j}\n" for j in range(M)))
    return path


def _losses(tmp_path: Path, k: int) -> tuple[Path, Path]:
    train, query = tmp_path / f"p{k}.npy", tmp_path / f"q{k}.npy"
    np.save(train, column(k, N))
    np.save(query, column(k, M, salt=1))
    return train, query


def test_init_on_a_full_disk_is_one_line(tmp_path: Path, ids: Path) -> None:
    url = str(tmp_path / "s.zarr")
    line = _one_line(_daunce("init", url, "--train-ids", str(ids), "--query-set", f"test={tmp_path / 'test.txt'}", "--chunk-rows", "16",
                             failpoint="enospc@put:2"), url, "init failed", "no space left on device", "delete")
    assert "run init again" in line
    with pytest.raises(errors.NotADaunceStoreError):  # what init left is not a store, as the line says
        daunce_store.open(url)


@pytest.mark.parametrize("n, what", [(1, "nothing of 'p3' was written"), (3, "reclaims its slot"), (7, "decided committed")])
def test_append_on_a_full_disk_is_one_line_and_loses_nothing(tmp_path: Path, ids: Path, n: int, what: str) -> None:
    """Failing before the slot claim, among the chunk writes, and at the commit record (after the fate)."""
    location = Location("local", str(tmp_path), None)
    fill(location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16), range(3))
    train, query = _losses(tmp_path, 3)
    failpoint = "enospc@put:1:_daunce/*" if n == 1 else ("enospc@put:2" if n == 3 else "enospc@put:1:_daunce/commits/*")
    _one_line(_daunce("append", location.url(), "--perturbation", "p3", "--train", str(train), "--query", f"test={query}",
                      failpoint=failpoint), location.url(), "append of perturbation 'p3' failed", "no space left on device", what)
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2]
    assert location.open().verify().ok
    location.open().gc(grace_seconds=0)  # what the line promised: reclaimed, or (decided) committed
    assert assert_consistent(location.open(mode="r")) == ([0, 1, 2, 3] if what == "decided committed" else [0, 1, 2])
    assert location.open().verify().findings == []


def test_compact_and_gc_on_a_failing_disk_are_one_line(tmp_path: Path) -> None:
    location = Location("local", str(tmp_path), None)
    s = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16, pack_width=2)
    fill(s, range(4))
    _one_line(_daunce("compact", location.url(), failpoint="eio@put:3:train/packed/*"), "compact failed", "input/output error",
              "next `daunce gc` reclaims it")
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    _one_line(_daunce("gc", location.url(), "--grace", "0", failpoint="enospc@put:2:_daunce/fates/*"), "gc failed",
              "no space left on device", "finishes the job")
    assert location.open().verify().ok
    location.open().gc(grace_seconds=0)
    assert location.open().compact()
    assert assert_consistent(location.open(mode="r")) == [0, 1, 2, 3]
    assert location.open().verify().findings == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_really_full_disk(tmp_path: Path, ids: Path) -> None:
    """A 1 MiB tmpfs filled by appends: the append that meets ENOSPC is one line, every committed column
    reads back, and once space is freed gc reclaims what the failed append left and appends go on."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        n = 8192  # 32 KiB a column
        location = Location("local", str(disk), None)
        s = location.init("s.zarr", [f"t{i}" for i in range(n)], chunk_rows=4096)
        (disk / "ballast").write_bytes(b"x" * 128 * 1024)  # freed later, to make room again
        committed = []
        with pytest.raises(errors.StorageError, match=r"append of perturbation 'p\d+' failed: no space left on device") as info:
            for k in range(100):
                s.append(f"p{k}", column(k, n))
                committed.append(k)
        assert str(info.value).count("\n") == 0 and location.url() in str(info.value)
        assert len(committed) > 5
        np.save(tmp_path / "more.npy", column(99, n))
        _one_line(_daunce("append", location.url(), "--perturbation", "p99", "--train", str(tmp_path / "more.npy")),
                  "no space left on device", "append of perturbation 'p99' failed")
        assert assert_consistent(location.open(mode="r"), query_set=None) == committed
        (disk / "ballast").unlink()
        location.open().gc(grace_seconds=0)
        assert location.open().verify().findings == []
        location.open().append(f"p{len(committed)}", column(len(committed), n))
        assert assert_consistent(location.open(mode="r"), query_set=None) == [*committed, len(committed)]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
