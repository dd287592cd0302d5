"""``daunce perturb``: build the model from a factory named in the config, and run N worker processes
(``spawn`` start method) that share the perturbations through the store's leases."""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daunce_store.errors import AlreadyCommittedError, DaunceStoreError, DivergedError, InvalidInputError, LeaseError
from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.perturb._config import PerturbConfig
from daunce_store.perturb._progress import NullReporter, Reporter, RichReporter, reporting
from daunce_store.perturb._runner import _check_sizes, fill_query_losses, run_perturbation
from daunce_store.store import StoreLike, default_worker_name, iso, perturbation_id, storage_errors

if TYPE_CHECKING:
    import torch

    from daunce_store.perturb._task import Task

__all__ = ["WorkerError", "load_factory", "build_from_config", "run_worker", "run_workers", "fill_query_sets"]


class WorkerError(DaunceStoreError):
    """A worker process failed; its traceback is on stderr. Committed columns stay valid: re-run to finish."""


def load_factory(spec: str, base_dir: str | os.PathLike[str] | None = None) -> Any:
    """The function named by ``'package.module:function'`` or ``'path/to/file.py:function'``.

    A relative file path is looked up next to ``base_dir`` (the config file's folder) first, then in
    the current directory.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(f"factory {spec!r} must look like 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
            path = Path(base_dir) / path
        if not path.exists():
            raise InvalidInputError(f"factory file {module_name!r} does not exist (looked in {base_dir} and {os.getcwd()})")
        path = path.resolve()
        # Import it under its own name, with its folder on sys.path so it can import its neighbours.
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        assert spec_ is not None and spec_.loader is not None
        module = importlib.util.module_from_spec(spec_)
        sys.modules.setdefault(path.stem, module)
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InvalidInputError(f"factory module {module_name!r} cannot be imported: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidInputError(f"factory module {module_name!r} has no function {attr!r}") from None


def build_from_config(config: PerturbConfig, base_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Call the config's factory: ``(model, task, train_data, query_data)``."""
    if not config.factory:
        raise InvalidInputError(
            "the config names no factory; add `factory: 'package.module:function'` returning "
            "(model, task, train_data, query_data)"
        )
    built = load_factory(config.factory, base_dir)(**config.factory_kwargs)
    if not isinstance(built, (tuple, list)) or len(built) != 4:
        raise InvalidInputError(f"factory {config.factory!r} must return (model, task, train_data, query_data)")
    model, task, train, queries = built
    return model, task, train, dict(queries or {})


# --- a worker --------------------------------------------------------------------------------------------
def run_worker(
    store: StoreLike,
    model: torch.nn.Module,
    task: Task,
    train_data: Any,
    query_data: Mapping[str, Any] | None,
    config: PerturbConfig,
    *,
    until: int,
    worker: str | None = None,
    progress: bool | Reporter = True,
    poll_seconds: float | None = None,
) -> list[Any]:
    """Claim, run and commit perturbations ``0..until-1`` until every one of them is committed.

    Several workers (threads, processes, machines) pointed at one store share the work through leases:
    a worker that dies mid-run stops renewing its lease, and once it expires another worker redoes that
    perturbation; a column is never committed twice. A lease whose holder ran on this host and has exited
    (a killed run being resumed) is taken over at once. When every remaining perturbation is leased by a
    live worker this one waits (``poll_seconds``, default a quarter of the lease) for them to finish or
    expire, and says on stderr what it waits for (once per change). Returns the commits this worker made.

    A perturbation whose fine-tune diverges (a NaN or inf objective, or losses the store refuses: NaN, inf,
    |loss| > ``MAX_ABS_LOSS``) is not committed: this worker says so in one line on stderr, gives its lease
    back and goes on with the next id, never trying that one again (:func:`run_workers` counts them).
    """
    if int(until) < 1:
        raise InvalidInputError(f"until={until}: ask for at least one perturbation")
    query_data = dict(query_data or {})
    _check_sizes(store, train_data, query_data)
    reporter: Reporter
    if isinstance(progress, Reporter):
        reporter = progress
    else:
        reporter = RichReporter(worker=worker or "") if progress else NullReporter()
    ids = [perturbation_id(k) for k in range(int(until))]
    wait = poll_seconds if poll_seconds is not None else min(5.0, config.lease_seconds / 4)
    commits: list[Any] = []
    worker = worker or _launcher_worker_name()  # leases and commit records carry it
    name = worker
    diverged: set[str] = set()  # seeds make a rerun diverge again: each is tried once per worker
    left = lambda: (f"the {len(commits)} perturbation(s) it committed stay; the one in flight is not visible: its lease "  # noqa: E731
                    "expires (or goes stale when this process is gone) and the next worker takes it over; `daunce gc` "
                    "reclaims what it wrote")
    try:
        with reporting(reporter), storage_errors(store.url, f"perturb (worker {name})", left):
            return _work(store, ids, model, task, train_data, query_data, config, worker, name, wait, reporter, commits, diverged)
    finally:
        reporter.close()


def _work(store: StoreLike, ids: list[str], model: Any, task: Any, train_data: Any, query_data: Any, config: Any, worker: str,
          name: str, wait: float, reporter: Any, commits: list[Any], diverged: set[str]) -> list[Any]:
    """:func:`run_worker`'s loop: claim the next free id, run it, until every id is committed."""
    waiting_on: frozenset[tuple[str, str]] = frozenset()
    while True:
        committed = {c.perturbation for c in store.commits()}
        remaining = [p for p in ids if p not in committed and p not in diverged]
        reporter.perturbations(len(ids), len(ids) - len(remaining))
        if not remaining:
            return commits
        lease = store.claim_next(remaining, worker=worker, ttl=config.lease_seconds)
        if lease is None:
            waiting_on = _say_what_we_wait_for(store, remaining, waiting_on, name)
            time.sleep(wait)
            continue
        waiting_on = frozenset()
        if lease.taken_over is not None:
            _say(f"{name}: took over perturbation {lease.perturbation} from {_holder(lease.taken_over)}, "
                 f"{_why_stale(lease.taken_over)}")
        try:
            commits.append(
                run_perturbation(
                    store, int(lease.perturbation), model, task, train_data, query_data, config,
                    lease=lease, reporter=reporter,
                )
            )
        except (LeaseError, AlreadyCommittedError):
            continue  # another worker took this one over; move on
        except DivergedError as e:  # its lease is given back already (run_perturbation); the next id
            diverged.add(lease.perturbation)
            reason = str(e).removeprefix(f"perturbation {lease.perturbation}: ")
            _say(f"{name}: perturbation {lease.perturbation} diverged and was not committed (going on with the next id): {reason}")


def _launcher_worker_name() -> str:
    """The store's :func:`default_worker_name` (``host:pid``, plus ``:slurm-<job>_<task>`` or ``:k8s-<index>``
    from the launcher's environment), plus ``:dask-<worker name>`` inside a Dask task, so that commit
    records say which launcher task made each column."""
    name = default_worker_name()
    # Only when the Dask worker has imported distributed itself: neither the store nor the runner imports it.
    distributed = sys.modules.get("distributed")
    get_worker = getattr(distributed, "get_worker", None)
    if get_worker is not None:
        try:
            name += f":dask-{get_worker().name}"
        except ValueError:  # "No worker found": not inside a Dask task
            pass
    return name


def _say(line: str) -> None:
    """A notice on stderr (above the progress bars when they are drawn in this process)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _holder(rec: Mapping[str, Any]) -> str:
    where = [f"host {rec['host']}"] if rec.get("host") else []
    where += [f"pid {rec['pid']}"] if rec.get("pid") is not None else []
    return f"worker {rec['worker']!r}" + (f" ({', '.join(where)})" if where else "")


def _why_stale(rec: Mapping[str, Any]) -> str:
    if rec["state"] == "holder-gone":
        return f"whose process on this host is gone (its lease ran until {iso(rec['expires_at'])})"
    return f"whose lease expired at {iso(rec['expires_at'])}"


def _say_what_we_wait_for(store: StoreLike, remaining: Sequence[str], before: frozenset[tuple[str, str]], name: str) -> frozenset[tuple[str, str]]:
    """Print the live leases of others that hold up ``remaining`` when they differ from ``before`` (new
    holders, not renewals); returns what was printed about, to compare with next time."""
    wanted = set(remaining)
    held = [r for r in store.leases() if r["perturbation"] in wanted]
    now_held = frozenset((r["perturbation"], r["token"]) for r in held)
    if held and now_held != before:
        now = time.time()
        lines = [
            f"  {r['perturbation']} held by {_holder(r)} until {iso(r['expires_at'])} "
            f"({max(0, round(r['expires_at'] - now))} s left)"
            for r in held
        ]
        _say(
            f"{name}: waiting for {len(held)} perturbation(s) leased by other workers:\n" + "\n".join(lines) + "\n"
            "  each is taken over when its lease expires, or as soon as its holder's process on this host exits "
            "(`daunce leases STORE` lists leases, `--release ID` frees one whose worker is dead elsewhere)"
        )
    return now_held


def _known_sets(store: StoreLike, queries: dict[str, Any]) -> dict[str, Any]:
    """The factory's query sets that the store has (others are for `daunce add-queries --config` later)."""
    return {name: data for name, data in queries.items() if name in store.query_sets()}


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _worker_main(url: str, storage_options: dict[str, Any] | None, config: dict[str, Any], base_dir: str | None,
                 until: int, worker: str, queue: Any, threads: int) -> None:
    import torch

    from daunce_store.store import open_store
    from daunce_store.perturb._progress import QueueReporter

    torch.set_num_threads(threads)
    # One line per warning, as `daunce` prints its own (not Python's file:line form with the source line).
    warnings.showwarning = lambda message, category, *_, **__: _say(f"warning ({category.__name__}) in {worker}: {message}")
    cfg = PerturbConfig.from_dict(config)
    # No queue without progress bars: a child blocked on a full, unread queue would never exit.
    reporter = QueueReporter(queue, worker) if queue is not None else NullReporter()
    with reporting(reporter):  # the factory's own slow steps (a hidden-state cache) show on the same bars
        model, task, train, queries = build_from_config(cfg, base_dir)
    store = open_store(url, storage_options=storage_options)
    queries = _known_sets(store, queries)
    run_worker(store, model, task, train, queries, cfg, until=until, worker=worker, progress=reporter)


def _devices(device: str, workers: int) -> list[str]:
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def run_workers(
    url: str,
    config: PerturbConfig,
    *,
    until: int | None = None,
    workers: int = 1,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    console: Any = None,
    progress: bool = True,
) -> int:
    """Run perturbations 0..until-1 into the store at ``url`` with ``workers`` processes; returns the
    number of committed columns among them. One worker runs in this process; more are ``spawn``-ed
    processes (one CPU share or one GPU each) that cooperate through leases, so this can also be run
    on several machines against one store.

    Perturbations whose fine-tune diverged are skipped by the workers (:func:`run_worker`); when the others
    are done, a :class:`~daunce_store.errors.DivergedError` says how many diverged, which, and what to do
    (the committed columns are valid: the same command again runs only what is missing)."""
    from daunce_store.store import open_store

    until = until or config.num_perturbations
    if not until or until < 1:
        raise InvalidInputError("how many perturbations? pass --until K or set num_perturbations in the config")
    if workers < 1:
        raise InvalidInputError(f"--workers {workers}: need at least one worker")
    if device:
        config = config.replace(device=device)
    store = open_store(url, storage_options=storage_options)  # fail early on a bad store
    ids = {perturbation_id(k) for k in range(until)}
    if workers > 1 and multiprocessing.current_process().daemon:
        # A Dask task (or any multiprocessing pool worker) runs in a daemonic process, which may not start
        # children ("daemonic processes are not allowed to have children"). One worker here still finishes
        # the run: the leases need no particular number of workers.
        warnings.warn(
            f"workers={workers}: this process is daemonic (a Dask task or a multiprocessing pool worker) and "
            "cannot start worker processes; running one worker in this process instead. Start more tasks "
            "(one per GPU) for more workers; see examples/dask/perturb_on_dask.py",
            RuntimeWarning,
            stacklevel=2,
        )
        workers = 1
    if workers == 1:
        reporter = RichReporter(console) if progress else NullReporter()
        try:
            with reporting(reporter):  # the factory's own slow steps (a hidden-state cache) show on the same bars
                model, task, train, queries = build_from_config(config, base_dir)
        except BaseException:
            reporter.close()
            raise
        queries = _known_sets(store, queries)
        run_worker(store, model, task, train, queries, config, until=until, progress=reporter)
    else:
        from daunce_store.perturb._progress import serve_queue_progress

        ctx = multiprocessing.get_context("spawn")  # fork after torch/zarr threads start can hang
        queue = ctx.Queue() if progress else None
        base_name = _launcher_worker_name()  # host:pid[:slurm-<job>_<task>|:k8s-<index>]
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(url, storage_options, config.replace(device=dev).to_dict(),
                      None if base_dir is None else os.fspath(base_dir), until, f"{base_name}:w{i}", queue,
                      _threads(workers) if dev == "cpu" else 1),
                name=f"daunce-worker-{i}",
            )
            for i, dev in enumerate(_devices(config.device, workers))
        ]
        for p in procs:
            p.start()
        try:
            if progress:
                serve_queue_progress(queue, procs, console)
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
        failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
        if failed:
            raise WorkerError(
                f"{len(failed)} of {workers} workers failed: {', '.join(failed)}; see their tracebacks above. "
                "Committed columns are valid; fix the cause and run the same command again to finish"
            )
    committed = ids & {c.perturbation for c in store.commits()}
    missing = sorted(ids - committed)
    if missing:  # every worker ended normally: what it left uncommitted, it saw diverge
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DivergedError(
            f"{len(missing)} of {until} perturbations diverged and were not committed ({shown}); the other "
            f"{len(committed)} are committed in {url}. Their fine-tunes produced NaN, inf or |loss| > {MAX_ABS_LOSS:g} "
            "(each worker said which on stderr): lower the learning rate (lr) or rho in the config, then run the "
            "same command again to redo only those"
        )
    return len(committed)


def fill_query_sets(
    url: str,
    config: PerturbConfig,
    names: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> dict[str, list[str]]:
    """Evaluate query sets ``names`` under the perturbations' stored weights; the config's factory must
    return them in its query_data. ``names`` given as ``{name: ids}`` are registered first, but only once
    every check passed (the factory returns them, with as many examples as ids, and the store kept
    weights): a refusal registers nothing. Returns the perturbation ids filled per set."""
    from daunce_store.store import open_store

    if device:
        config = config.replace(device=device)
    store = open_store(url, storage_options=storage_options)
    register = dict(names) if isinstance(names, Mapping) else {}
    if not any(c.metadata.get("adapter") for c in store.commits()):
        raise InvalidInputError(
            f"{store.url} kept no weights (its run had keep_adapters: false), so a new query set cannot be evaluated under "
            "its perturbed models; nothing was added. Rerun `daunce perturb` with keep_adapters: true into a new store"
        )
    model, task, _, queries = build_from_config(config, base_dir)
    for name in names:
        if name not in queries:
            raise InvalidInputError(
                f"the factory {config.factory!r} returns no query set {name!r} (it returns {sorted(queries)}); "
                "return the new query set's examples under that name"
            )
        if name in register and len(register[name]) != len(queries[name]):
            raise InvalidInputError(f"query set {name!r}: {len(register[name])} ids but the factory returns "
                                    f"{len(queries[name])} examples")
    for name, ids in register.items():
        store.add_query_set(name, ids)
    return {name: fill_query_losses(store, model, task, name, queries[name], config) for name in names}
