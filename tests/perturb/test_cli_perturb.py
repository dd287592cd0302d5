"""`daunce perturb` through the real entry point: two spawned workers, a worker killed mid-run, and
`daunce add-queries --config` filling a later query set from stored weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import daunce_store  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
DAUNCE = Path(sys.executable).with_name("daunce")


def _daunce(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(DAUNCE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kw)


def _run(*args: str, timeout: float = 240) -> str:
    p = _daunce(*args)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the command and the workers it spawned
        out, _ = p.communicate()
        pytest.fail(f"daunce {' '.join(args[:1])} did not finish in {timeout} s:\n{out}")
    assert p.returncode == 0, out
    return out


def _init(tmp_path: Path) -> Path:
    tid, qid = F.digits_ids()
    (tmp_path / "train.txt").write_text("\n".join(tid) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(qid) + "\n")
    store = tmp_path / "digits.zarr"
    _run("init", str(store), "--train-ids", str(tmp_path / "train.txt"), "--query-set", f"test={tmp_path / 'test.txt'}",
         "--chunk-rows", "4096", "--capacity", "64", "--pack-width", "4")
    return store


def _config(tmp_path: Path, **fields) -> Path:
    import yaml

    cfg = {"factory": f"{HERE / 'perturb_factories.py'}:digits", "epochs": 2, "lr": 0.01, "batch_size": 64,
           "eval_batch_size": 2048, **fields}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _commit_records(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "_daunce" / "commits").glob("*.json"))]


def test_two_workers_share_the_perturbations(tmp_path: Path) -> None:
    store = _init(tmp_path)
    # Slow enough per perturbation (~1 s) that both spawned workers get some of them.
    config = _config(tmp_path, ratio=1.0, epochs=8, batch_size=16, keep_adapters=True)
    out = _run("perturb", str(store), "--config", str(config), "--workers", "2", "--until", "8", "--no-progress")
    assert "8 of 8 perturbations committed" in out
    records = _commit_records(store)
    assert sorted(r["perturbation"] for r in records) == [f"{k:06d}" for k in range(8)]
    assert len({r["slot"] for r in records}) == 8
    assert len({r["worker"] for r in records}) == 2, [r["worker"] for r in records]
    s = daunce_store.open(store, mode="r")
    assert np.isfinite(s.train_losses()).all() and s.query_losses("test").shape == (597, 8)
    # `perturb` compacts at the end: both full groups of 4 columns are packed into wide chunks.
    assert s.status()["packed_columns"] == 8
    # A query set added later gets its losses from the stored weights (full fine-tunes here).
    (tmp_path / "later.txt").write_text("\n".join(f"later-{j}" for j in range(597)) + "\n")
    config.write_text(config.read_text() + "factory_kwargs: {later: true}\n")
    out = _run("add-queries", str(store), "--query-set", f"later={tmp_path / 'later.txt'}", "--config", str(config))
    assert "later: losses under 8 stored perturbations" in out
    s = daunce_store.open(store, mode="r")
    np.testing.assert_allclose(s.query_losses("later"), s.query_losses("test"), rtol=1e-5, atol=1e-6)


def test_a_killed_worker_is_redone_and_k_is_exact(tmp_path: Path) -> None:
    store = _init(tmp_path)
    config = _config(tmp_path, ratio=1.0, epochs=12, batch_size=16, lease_seconds=3.0)
    proc = _daunce("perturb", str(store), "--config", str(config), "--until", "4", "--no-progress")
    s = daunce_store.open(store, mode="r")
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until one column is in and the next is being trained
        if proc.poll() is not None:
            pytest.fail(f"the worker finished before it could be killed: {proc.stdout.read()}")
        if s.num_columns() >= 1 and s.leases():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker never got going")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {lease["perturbation"] for lease in s.stale_leases()}
    assert killed and s.num_columns() < 4
    # The store is valid after the kill: committed columns read back whole, nothing half-visible.
    before = s.num_columns()
    assert np.isfinite(s.train_losses()).all() and s.train_losses().shape[1] == before
    # A restarted run takes over the dead worker's lease at once, redoes its perturbation, and stops at exactly K.
    out = _run("perturb", str(store), "--config", str(config), "--until", "4", "--no-progress")
    assert "4 of 4 perturbations committed" in out
    records = _commit_records(store)
    assert sorted(r["perturbation"] for r in records) == [f"{k:06d}" for k in range(4)]
    assert len({r["slot"] for r in records}) == 4
    s = daunce_store.open(store, mode="r")
    assert s.num_columns() == 4 and np.isfinite(s.train_losses()).all()
    assert s.status()["slots_claimed"] >= 4 and not s.leases()
    # The redone perturbation is the one the dead worker would have made: same seeds, same column.
    import torch

    from daunce_store.perturb import PerturbConfig, build_from_config, run_perturbation

    torch.set_num_threads(1)
    (pid,) = killed
    cfg = PerturbConfig.from_yaml(config)
    model, task, train, queries = build_from_config(cfg)
    fresh = daunce_store.init(tmp_path / "fresh.zarr", list(s.train_ids), {"test": list(s.query_ids("test"))},
                              chunk_rows=4096, capacity=64)
    run_perturbation(fresh, int(pid), model, task, train, queries, cfg)
    slot = next(c.slot for c in s.commits() if c.perturbation == pid)
    np.testing.assert_allclose(s.train_losses(slots=[slot])[:, 0], fresh.train_losses()[:, 0], rtol=1e-5, atol=1e-6)


def test_a_full_disk_mid_perturb_is_one_line(tmp_path: Path) -> None:
    """The second perturbation's chunk write meets ENOSPC (a failpoint: the store's 3rd train-chunk write):
    `daunce perturb` ends with one line naming the store, the operation and what was left; the first column
    is committed intact, and a rerun (space back) finishes the job."""
    store = _init(tmp_path)
    config = _config(tmp_path, ratio=1.0, epochs=1, batch_size=64)
    env = dict(os.environ, OMP_NUM_THREADS="1", DAUNCE_STORE_FAILPOINT="enospc@put:2:train/losses/c/*", COLUMNS="80")
    proc = subprocess.run([str(DAUNCE), "perturb", str(store), "--config", str(config), "--until", "3", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(store) in errors[0] and "append of perturbation '000001' failed: no space left on device" in errors[0], errors[0]
    assert "nothing of '000001' is visible" in errors[0]
    s = daunce_store.open(store, mode="r")
    assert s.num_columns() == 1 and np.isfinite(s.train_losses()).all()
    out = _run("perturb", str(store), "--config", str(config), "--until", "3", "--no-progress")
    assert "3 of 3 perturbations committed" in out
    daunce_store.open(store).gc(grace_seconds=0)
    assert daunce_store.open(store).verify().findings == []
