"""Daunce perturbations on a Dask cluster: one task per GPU, each a ``run_worker`` sharing perturbations
0..K-1 with the others through the store's leases (no coordinator). Every task returns once all K columns
are committed; then this script compacts the store once.

    # a cluster whose workers each have one GPU and advertise it: `dask worker SCHEDULER --resources GPU=1`
    # (one worker process per GPU, CUDA_VISIBLE_DEVICES set per worker, e.g. dask_cuda's LocalCUDACluster)
    python perturb_on_dask.py s3://bucket/attrib.zarr --config run.yaml --until 256 --tasks 8 --scheduler tcp://host:8786

    # or on this machine: a LocalCluster of 2 worker processes, each with one "GPU" slot
    python perturb_on_dask.py attrib.zarr --config run.yaml --until 16 --tasks 2 --local-workers 2 --device cpu

``daunce init`` the store first. Store on S3: the AWS_* environment variables of the Dask workers, or
``--storage-options '{"endpoint": ...}'``.

**Daemonic workers.** Dask runs tasks in daemonic processes, and a daemonic process may not start children
("daemonic processes are not allowed to have children"): a torch ``DataLoader(num_workers>0)``, a
``multiprocessing`` pool or ``daunce perturb --workers N`` inside a task fails. The runner itself starts no
processes (it batches by indexing the dataset in its own process, no DataLoader workers), so a task that
calls ``run_worker`` works as is, and ``run_workers(workers=N)`` in a daemonic process falls back to one
in-process worker with a ``RuntimeWarning``. If your factory starts processes (``datasets.map(num_proc=...)``,
a DataLoader), keep it to one process inside a task (``num_proc=None``, ``num_workers=0``), or start the workers non-daemonic (``dask.config.set({"distributed.worker.daemon": False})``
before the cluster starts; then a killed worker may leave those children behind). For more parallelism,
submit more tasks, one per GPU.

**Failures.** A task whose worker dies is rescheduled by Dask on another worker (up to
``distributed.scheduler.allowed-failures`` times): it skips committed columns and takes the dead task's
lease over once it expires (``lease_seconds`` in the config; at once on the same host), and a column is
never committed twice. Commit records name the Dask worker: ``host:pid:dask-<worker name>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def perturb_task(url: str, config_path: str, until: int, device: str | None = None,
                 storage_options: dict[str, Any] | None = None, threads: int = 1) -> list[str]:
    """Runs on a Dask worker: build the model from the config's factory, then claim, run and commit
    perturbations until 0..until-1 are all committed. Returns the ids this task committed."""
    import torch

    import daunce_store
    from daunce_store.perturb import PerturbConfig, build_from_config, run_worker

    # A Dask task runs in a daemonic process (multiprocessing.current_process().daemon): it may start no
    # children. The runner starts none; the factory must not either (DataLoader num_workers=0, no pools).
    torch.set_num_threads(threads)
    cfg = PerturbConfig.from_yaml(config_path)
    if device:
        cfg = cfg.replace(device=device)
    model, task, train, queries = build_from_config(cfg, base_dir=Path(config_path).parent)
    store = daunce_store.open(url, mode="a", storage_options=storage_options)
    queries = {name: data for name, data in queries.items() if name in store.query_sets()}
    # worker=None: the runner names this worker host:pid:dask-<Dask worker name> (get_worker(), guarded).
    commits = run_worker(store, model, task, train, queries, cfg, until=until, progress=False)
    return [c.perturbation for c in commits]


def run_on_dask(client: Any, url: str, config_path: str, *, until: int, tasks: int, device: str | None = None,
                storage_options: dict[str, Any] | None = None, compact: bool = True) -> dict[str, list[str]]:
    """Submit ``tasks`` perturbation tasks (one GPU each), wait for them, compact the store once.
    Returns the ids each task committed, by task key."""
    import daunce_store

    config_path = str(Path(config_path).resolve())  # the workers' file system must see it (shared disk)
    futures = [
        # pure=False: identical arguments, yet distinct tasks (Dask would otherwise run one and share it).
        # resources={"GPU": 1}: at most one task per worker that advertises one GPU.
        client.submit(perturb_task, url, config_path, until, device, storage_options,
                      resources={"GPU": 1}, pure=False, key=f"daunce-perturb-{i}")
        for i in range(tasks)
    ]
    done = dict(zip((f.key for f in futures), client.gather(futures)))
    if compact:  # once, after every task: packs committed columns into wide chunks for fast scans
        daunce_store.open(url, mode="a", storage_options=storage_options).compact()
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="store path or URL (daunce init it first)")
    p.add_argument("--config", required=True, help="the perturb run's YAML (PerturbConfig fields + factory)")
    p.add_argument("--until", type=int, required=True, help="K: run until perturbations 0..K-1 are committed")
    p.add_argument("--tasks", type=int, default=2, help="tasks to submit, one GPU each")
    p.add_argument("--device", default=None, help="torch device (overrides the config), e.g. cuda or cpu")
    p.add_argument("--storage-options", default=None, help="JSON for the object store")
    p.add_argument("--no-compact", action="store_true", help="skip the final compaction")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--local-workers", type=int, help="start a LocalCluster of this many worker processes, "
                                                         "each advertising one GPU")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    options = json.loads(args.storage_options) if args.storage_options else None
    if args.scheduler:
        cluster = None
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(processes=True, n_workers=args.local_workers, threads_per_worker=1,
                               resources={"GPU": 1}, dashboard_address=None)
        client = Client(cluster)
    try:
        done = run_on_dask(client, args.store, args.config, until=args.until, tasks=args.tasks, device=args.device,
                           storage_options=options, compact=not args.no_compact)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for key, ids in done.items():
        print(f"{key}: committed {len(ids)} perturbation(s) {' '.join(ids)}")


if __name__ == "__main__":
    main()
