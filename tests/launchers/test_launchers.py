"""The cluster recipes in examples/ run as they are written: the SLURM array script (a stand-in `srun`
execs the command it wraps) with two array tasks, one killed and requeued; the Kubernetes Indexed Job's
command, expanded the way Kubernetes expands it; the Dask recipe on a LocalCluster of two processes. Every
perturbation id is committed exactly once, and the commit records name the launcher's task."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from daunce_store.store import default_worker_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SBATCH = EXAMPLES / "slurm" / "perturb.sbatch"
K8S_JOB = EXAMPLES / "kubernetes" / "perturb-job.yaml"
K8S_COMPACT = EXAMPLES / "kubernetes" / "compact-job.yaml"
DASK_RECIPE = EXAMPLES / "dask" / "perturb_on_dask.py"
DAUNCE = Path(sys.executable).with_name("daunce")
LAUNCHER_ENV = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "JOB_COMPLETION_INDEX")


# --- default worker names (no torch) ---------------------------------------------------------------------
@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, suffix",
    [
        ({}, ""),
        ({"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "4243"}, ":slurm-4242_0"),
        ({"SLURM_ARRAY_TASK_ID": "7"}, ":slurm-7"),
        ({"SLURM_JOB_ID": "99"}, ":slurm-99"),
        ({"JOB_COMPLETION_INDEX": "0"}, ":k8s-0"),
        ({"SLURM_ARRAY_TASK_ID": ""}, ""),
    ],
)
def test_default_worker_name_carries_the_launchers_task(no_launcher: pytest.MonkeyPatch, env: dict, suffix: str) -> None:
    import socket

    for name, value in env.items():
        no_launcher.setenv(name, value)
    assert default_worker_name() == f"{socket.gethostname()}:{os.getpid()}{suffix}"


# --- the recipes as files (no torch) ---------------------------------------------------------------------
def _perturb_flags() -> set[str]:
    """The options `daunce perturb --help` lists."""
    out = subprocess.run([str(DAUNCE), "perturb", "--help"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out))


def _sbatch_command() -> list[str]:
    """The srun line of the sbatch script (continuations joined), split into words."""
    import shlex

    text = SBATCH.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("srun ")]
    return shlex.split(line)


def _k8s_docs() -> tuple[dict, dict]:
    import yaml

    docs = list(yaml.safe_load_all(K8S_JOB.read_text()))
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return job, config_map


def test_recipes_use_options_the_cli_has() -> None:
    import yaml

    flags = _perturb_flags()
    assert {"--config", "--until", "--no-compact", "--device", "--storage-options"} <= flags
    # SLURM: an array, requeued on preemption, one GPU per task, and the command's flags exist.
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+", text, re.M) and re.search(r"^#SBATCH --requeue\b", text, re.M)
    cmd = _sbatch_command()
    daunce = cmd[cmd.index("daunce"):]
    assert daunce[:2] == ["daunce", "perturb"] and "--no-compact" in daunce and "--device" in daunce
    assert {w for w in daunce if w.startswith("--")} <= flags
    assert "daunce compact" in text  # the final step, as a dependency job
    # Kubernetes: an Indexed Job whose pods are retried after eviction, running the same command.
    job, config_map = _k8s_docs()
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and spec["completionMode"] == "Indexed"
    assert spec["parallelism"] >= 1 and spec["completions"] >= spec["parallelism"] and spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget"} in r.get("onPodConditions", []) for r in rules)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = pod["containers"]
    words = container["command"] + container["args"]
    assert words[:2] == ["daunce", "perturb"] and "--no-compact" in words
    assert {w for w in words if w.startswith("--")} <= flags
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any("secretRef" in e for e in container["envFrom"])  # S3 credentials from a secret
    # The config it mounts is a valid PerturbConfig.
    from daunce_store.perturb import PerturbConfig

    cfg = PerturbConfig.from_dict(yaml.safe_load(config_map["data"]["run.yaml"]))
    assert cfg.factory and cfg.lease_seconds > 0
    compact = yaml.safe_load(K8S_COMPACT.read_text())
    assert compact["spec"]["template"]["spec"]["containers"][0]["command"] == ["daunce", "compact"]


# --- the recipes, run (torch) ----------------------------------------------------------------------------
def _torch() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def _finish(p: subprocess.Popen, what: str, timeout: float = 150) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{out}")
    assert p.returncode == 0, f"{what} exited {p.returncode}:\n{out}"
    return out


def _committed_once(store: Path, k: int) -> list[dict]:
    from test_cli_perturb import _commit_records

    records = _commit_records(store)
    assert sorted(r["perturbation"] for r in records) == [f"{i:06d}" for i in range(k)]  # all, each once
    assert len({r["slot"] for r in records}) == k
    return records


@pytest.mark.train
@pytest.mark.slow
def test_slurm_array_tasks_share_the_run_and_a_killed_task_is_requeued(tmp_path: Path) -> None:
    _torch()
    from test_cli_perturb import _commit_records, _config, _init

    import daunce_store

    store = _init(tmp_path)
    k = 8
    config = _config(tmp_path, convergence_probe=0, ratio=1.0, epochs=8, batch_size=16, lease_seconds=30.0)
    # A stand-in srun: drop its options, exec the command (what srun does for a one-task step).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\n'
                                  'exec "$@"\n')
    (bin_dir / "srun").chmod(0o755)

    def task(i: int, restart: int = 0) -> subprocess.Popen:
        env = _env(PATH=f"{bin_dir}:{DAUNCE.parent}:{os.environ['PATH']}", STORE=str(store), CONFIG=str(config),
                   K=str(k), DEVICE="cpu", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(i),
                   SLURM_RESTART_COUNT=str(restart))
        return _popen(["bash", str(SBATCH)], env)

    first, second = task(0), task(1)
    s = daunce_store.open(store, mode="r")
    deadline = time.time() + 150
    while time.time() < deadline:  # task 1 has committed a column and is training the next one
        if second.poll() is not None:
            pytest.fail(f"array task 1 finished before it could be killed:\n{second.stdout.read()}")
        mine = [r for r in _commit_records(store) if r["worker"].endswith(":slurm-4242_1")]
        held = [r for r in s.leases() if r["worker"].endswith(":slurm-4242_1")]
        if mine and held:
            break
        time.sleep(0.05)
    else:
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(second.pid, signal.SIGKILL)
        pytest.fail("array task 1 never got going")
    os.killpg(second.pid, signal.SIGKILL)  # preempted: the batch script and its step, no clean-up
    second.wait()
    (dead,) = {(r["perturbation"], r["worker"]) for r in held}
    # SLURM requeues the task: the same script, the same array task id.
    requeued = task(1, restart=1)
    outs = [_finish(first, "array task 0"), _finish(requeued, "requeued array task 1")]
    assert all(f"{k} of {k} perturbations committed" in out for out in outs), outs
    records = _committed_once(store, k)
    # The dead task's perturbation was taken over at once (its holder's process on this host is gone) and
    # redone, unless it was committed in the instant before the kill.
    by = {r["perturbation"]: r["worker"] for r in records}
    assert by[dead[0]] == dead[1] or any(f"took over perturbation {dead[0]}" in out for out in outs), outs
    tasks = {re.search(r":slurm-4242_(\d+)$", r["worker"]).group(1) for r in records}
    assert tasks == {"0", "1"}, [r["worker"] for r in records]
    s = daunce_store.open(store, mode="r")
    assert s.num_columns() == k and not s.leases()
    assert s.status()["packed_columns"] == 0  # --no-compact: the dependency job compacts
    subprocess.run([str(DAUNCE), "compact", str(store)], check=True, capture_output=True, env=_env())
    assert daunce_store.open(store, mode="r").status()["packed_columns"] == k


def _k8s_expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command and args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], w) for w in words]


@pytest.mark.train
@pytest.mark.slow
def test_k8s_indexed_job_command_runs(tmp_path: Path) -> None:
    _torch()
    from test_cli_perturb import _config, _init

    store = _init(tmp_path)
    config = _config(tmp_path, convergence_probe=0, ratio=1.0, epochs=2)
    job, _ = _k8s_docs()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(STORE=str(store), CONFIG=str(config), K="3", DEVICE="cpu")  # the cluster's values, made local
    words = _k8s_expand(container["command"] + container["args"], env)
    words[0] = str(DAUNCE)
    out = _finish(_popen(words, _env(JOB_COMPLETION_INDEX="3")), "the Indexed Job's command")
    assert "3 of 3 perturbations committed" in out
    records = _committed_once(store, 3)
    assert all(r["worker"].endswith(":k8s-3") for r in records), [r["worker"] for r in records]


@pytest.mark.train
@pytest.mark.slow
def test_dask_recipe_on_a_local_cluster(tmp_path: Path) -> None:
    _torch()
    pytest.importorskip("distributed")
    from test_cli_perturb import _config, _init

    import daunce_store

    store = _init(tmp_path)  # pack width 4
    config = _config(tmp_path, convergence_probe=0, ratio=1.0, epochs=6, batch_size=16)
    cmd = [sys.executable, str(DASK_RECIPE), str(store), "--config", str(config), "--until", "4", "--tasks", "2",
           "--local-workers", "2", "--device", "cpu"]
    out = _finish(_popen(cmd, _env()), "the Dask recipe")
    assert "daunce-perturb-0:" in out and "daunce-perturb-1:" in out, out
    records = _committed_once(store, 4)
    assert all(re.search(r":dask-[01]$", r["worker"]) for r in records), [r["worker"] for r in records]
    assert daunce_store.open(store, mode="r").status()["packed_columns"] == 4  # compacted once at the end


@pytest.mark.train
def test_run_workers_in_a_daemonic_process_falls_back_to_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Dask task is a daemonic process: it may not spawn workers, so `workers=2` runs one, in-process."""
    _torch()
    from test_cli_perturb import _config, _init

    from daunce_store.perturb import PerturbConfig, _workers

    store = _init(tmp_path)
    config = _config(tmp_path, convergence_probe=0, ratio=1.0, epochs=1)
    monkeypatch.setattr(_workers.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    with pytest.warns(RuntimeWarning, match="daemonic"):
        done = _workers.run_workers(str(store), PerturbConfig.from_yaml(config), until=2, workers=2,
                                    base_dir=config.parent, progress=False)
    assert done == 2
    records = _committed_once(store, 2)
    assert {r["worker"] for r in records} == {_workers._launcher_worker_name()}  # this process, no children
