"""Stale leases through the real entry point: `daunce leases` lists and releases leases; a resumed
`daunce perturb` takes over the lease of a SIGKILLed run on this host at once (not after lease_seconds),
and while a live worker holds an id it says what it waits for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import re
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store import cli
from daunce_store.cli import app

runner = CliRunner()
DAUNCE = Path(sys.executable).with_name("daunce")
N_TRAIN, N_QUERY = 200, 20

# A tiny classifier for `daunce perturb`, written next to the store (the factory is loaded by file path).
FACTORY = """
import torch
from daunce_store.perturb import ClassificationTask

def tiny(n_train={n}, n_query={m}):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_query, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    train = torch.utils.data.TensorDataset(x[:n_train], y[:n_train])
    test = torch.utils.data.TensorDataset(x[n_train:], y[n_train:])
    return model, ClassificationTask(), train, {{"test": test}}
""".format(n=N_TRAIN, m=N_QUERY)

# Holds a lease on argv[2] for argv[3] seconds (never renewed), then sleeps until killed.
HOLDER = """
import json, sys, time
import daunce_store
lease = daunce_store.open(sys.argv[1]).claim(sys.argv[2], worker="holder", ttl=float(sys.argv[3]))
print(json.dumps(None if lease is None else lease.record()), flush=True)
time.sleep(3600)
"""

# The same, but renews its lease (ttl argv[3]) until its stdin is closed; then lets it expire, alive.
RENEWING_HOLDER = """
import json, select, sys, time
import daunce_store
store = daunce_store.open(sys.argv[1])
ttl = float(sys.argv[3])
lease = store.claim(sys.argv[2], worker="holder", ttl=ttl)
print(json.dumps(None if lease is None else lease.record()), flush=True)
while not select.select([sys.stdin], [], [], ttl / 3)[0]:
    lease = store.renew(lease, ttl=ttl)
time.sleep(3600)
"""


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    daunce_store.init(path, [f"t{i}" for i in range(N_TRAIN)], {"test": [f"q{j}" for j in range(N_QUERY)]},
                      chunk_rows=64, capacity=16)
    return path


def _holder(store: Path, pid: str, ttl: float, script: str = HOLDER) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(store), pid, str(ttl)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    record = json.loads(proc.stdout.readline() or "null")
    assert record is not None, "the holder did not get its lease"
    return proc, record


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no clean-up, no release
    proc.wait()


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide consoles, so that table cells and messages are not cut or wrapped at 80 columns."""
    monkeypatch.setattr(cli.console, "width", 200)
    monkeypatch.setattr(cli.err_console, "width", 200)


def _leases_json(store: Path) -> list[dict]:
    result = runner.invoke(app, ["leases", str(store), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- daunce leases ---------------------------------------------------------------------------------------
def test_leases_lists_and_releases(tmp_path: Path, wide: None) -> None:
    store = _store(tmp_path)
    s = daunce_store.open(store)
    s.append("p0", np.zeros(N_TRAIN, np.float32))
    s.claim("p1", worker="alive-here", ttl=300)  # this process: live
    proc, dead = _holder(store, "p2", 300)
    _stop(proc)  # killed: holder-gone, with 300 s still on its clock
    s.claim("p3", worker="short", ttl=0.01)
    time.sleep(0.05)  # expired

    rows = {r["perturbation"]: r for r in _leases_json(store)}
    assert set(rows) == {"p1", "p2", "p3"}  # p0 is committed: not listed
    assert {k: r["state"] for k, r in rows.items()} == {"p1": "live", "p2": "holder-gone", "p3": "expired"}
    assert rows["p2"]["worker"] == "holder" and rows["p2"]["pid"] == dead["pid"] and rows["p2"]["host"] == dead["host"]
    assert rows["p2"]["seconds_left"] > 200 and rows["p2"]["expires"].endswith("+00:00")
    table = runner.invoke(app, ["leases", str(store)])
    assert table.exit_code == 0 and "holder-gone" in table.output and "expired" in table.output

    result = runner.invoke(app, ["leases", str(store), "--release", "p2", "--release", "p1"])
    assert result.exit_code == 0, result.output
    assert "released the lease on 'p2' held by worker 'holder' (its holder's process had exited)" in result.output
    assert "released the lease on 'p1'" in result.output and "it was live" in result.output
    rows = {r["perturbation"]: r for r in _leases_json(store)}
    assert rows["p1"]["state"] == rows["p2"]["state"] == "released" and rows["p3"]["state"] == "expired"
    assert s.claim("p2", worker="next") is not None  # free for any worker

    for bad, message in (("p0", "perturbation 'p0' is committed"), ("p9", "perturbation 'p9' has no lease"),
                         ("p1", "already released")):
        result = runner.invoke(app, ["leases", str(store), "--release", bad])
        assert result.exit_code == 2, result.output
        assert result.output.count("error:") == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_leases_of_an_empty_store(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert _leases_json(store) == []
    result = runner.invoke(app, ["leases", str(store)])
    assert result.exit_code == 0 and "no leases" in result.output


# --- daunce perturb with stale and live leases -------------------------------------------------------------
def _config(tmp_path: Path, **fields) -> Path:
    pytest.importorskip("torch")
    import yaml

    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent(FACTORY))
    cfg = {"factory": f"{tmp_path / 'tiny_factory.py'}:tiny", "epochs": 2, "lr": 0.01, "batch_size": 32,
           "eval_batch_size": 256, "convergence_probe": 0, **fields}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _perturb(store: Path, config: Path, until: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(DAUNCE), "perturb", str(store), "--config", str(config), "--until", str(until), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"daunce perturb did not finish in {timeout} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def _commits(store: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["perturbation"] for p in (store / "_daunce" / "commits").glob("*.json"))


@pytest.mark.slow
@pytest.mark.train
def test_resumed_perturb_takes_over_a_killed_runs_lease_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ttl = 300.0
    # Slow enough (a few seconds for the one perturbation) to be killed while it trains.
    config = _config(tmp_path, epochs=200, batch_size=8, lease_seconds=ttl)
    proc = _perturb(store, config, until=1)
    s = daunce_store.open(store, mode="r")
    deadline = time.time() + 120
    while not s.leases():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run never held a lease: {proc.communicate()[0]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert s.num_columns() == 0
    (stale,) = s.stale_leases()  # 300 s on the clock, but its process is gone
    assert stale["perturbation"] == "000000" and stale["state"] == "holder-gone" and stale["pid"] == proc.pid
    assert stale["expires_at"] - time.time() > ttl / 2

    start = time.time()
    out = _finish(_perturb(store, config, until=1), timeout=ttl / 3)
    elapsed = time.time() - start
    assert elapsed < ttl / 3, elapsed  # it did not wait out the dead run's lease
    assert "took over perturbation 000000" in out and "process on this host is gone" in out, out
    assert "waiting for" not in out, out
    assert "1 of 1 perturbations committed" in out, out
    assert _commits(store) == ["000000"]
    s = daunce_store.open(store, mode="r")
    assert s.num_columns() == 1 and s.lease_table() == [] and np.isfinite(s.train_losses()).all()


@pytest.mark.slow
@pytest.mark.train
def test_perturb_says_what_it_waits_for_then_takes_over_after_expiry(tmp_path: Path) -> None:
    store = _store(tmp_path)
    # Alive and renewing (3 s leases) until the worker has said it waits; then the lease runs out.
    holder, record = _holder(store, "000000", ttl=3.0, script=RENEWING_HOLDER)
    stop_renewing = threading.Timer(120, holder.stdin.close)  # in case the message never comes
    stop_renewing.start()
    try:
        config = _config(tmp_path, lease_seconds=8.0)  # polls every 2 s
        proc = _perturb(store, config, until=1)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "waiting for" in line:
                time.sleep(3)  # two more polls while it is renewed: the message is not repeated
                holder.stdin.close()
        out = "".join(lines) + _finish(proc, timeout=120)
    finally:
        stop_renewing.cancel()
        _stop(holder)
    assert "waiting for 1 perturbation(s) leased by other workers" in out, out
    held = re.search(r"000000 held by worker 'holder' \(host (\S+), pid (\d+)\) until (\S+) \((\d+) s left\)", out)
    assert held is not None, out
    assert held[1] == record["host"] and int(held[2]) == holder.pid and held[3].endswith("+00:00") and int(held[4]) <= 3
    assert out.count("waiting for") == 1, out  # said once, not at every poll nor at every renewal
    assert "took over perturbation 000000 from worker 'holder'" in out and "whose lease expired at" in out, out
    assert "1 of 1 perturbations committed" in out, out
    assert _commits(store) == ["000000"]
