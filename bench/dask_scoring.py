"""Benchmark of exact distributed scoring on Dask (issue 14; not a test).

    python bench/dask_scoring.py                  # 10M x 64, m = 100, k = 10: single process, then LocalCluster 1 and 2 workers
    python bench/dask_scoring.py --n 2000000      # a smaller store (built by bench/topk.py's build_store if absent)
    python bench/dask_scoring.py --table          # the markdown table of bench/_data/dask_scoring.jsonl

On the compacted store of ``bench/topk.py``'s ``build_store`` (random float32 columns without recorded
draws, so ``auto`` is ``whitened``; page cache warm), times ``store.topk(set, m queries, k, measure)`` in
this process and with ``client=`` a ``distributed.LocalCluster(n_workers=w, threads_per_worker=1,
processes=True)`` on the same machine, each call on a freshly opened handle (so ``whitened`` pays its Gram
pass every time, on the cluster when there is one), best of ``--repeat``. The cluster's start is timed apart.
Every distributed answer is checked against the single-process one (indices and scores equal).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_row  # noqa: E402
from topk import DATA, build_store  # noqa: E402  (the bench helpers)

import daunce_store  # noqa: E402

RESULTS = DATA / "dask_scoring.jsonl"


def _timed(path: Path, queries: list[str], args: argparse.Namespace, measure: str, client=None, partition_rows=None):
    times, result = [], None
    for _ in range(args.repeat):
        store = daunce_store.open(path, mode="r")  # fresh: no cached Gram
        t = time.perf_counter()
        result = store.topk("bench", queries, k=args.k, measure=measure, client=client, partition_rows=partition_rows)
        times.append(time.perf_counter() - t)
    return min(times), result


def _same(a, b) -> bool:
    return all(np.array_equal(a.indices[s], b.indices[s]) and np.array_equal(a.scores[s], b.scores[s]) for s in a.indices)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--kc", type=int, default=64)
    p.add_argument("--m", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--measures", nargs="+", default=["cov", "whitened"])
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        return print_table()
    from distributed import Client, LocalCluster

    path = build_store(args.n, args.kc, packed=True)
    queries = [f"q{j}" for j in range(args.m)]
    common = {"n": args.n, "kc": args.kc, "m": args.m, "k": args.k}
    single = {}
    for measure in args.measures:
        _timed(path, queries, argparse.Namespace(**{**vars(args), "repeat": 1}), measure)  # warm the page cache
        seconds, single[measure] = _timed(path, queries, args, measure)
        append_row(RESULTS, {**common, "measure": measure, "how": "single process", "workers": 0, "seconds": round(seconds, 3)})
    for workers in args.workers:
        t = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            start = time.perf_counter() - t
            for measure in args.measures:
                _timed(path, queries, argparse.Namespace(**{**vars(args), "repeat": 1}), measure, client)  # warm the workers
                seconds, got = _timed(path, queries, args, measure, client)
                append_row(RESULTS, {**common, "measure": measure, "how": "LocalCluster", "workers": workers, "seconds": round(seconds, 3),
                         "cluster_start_s": round(start, 2), "partitions": -(-args.n // (1 << 22)),
                         "same_answer": _same(got, single[measure])})


def print_table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    base = {(r["n"], r["kc"], r["m"], r["measure"]): r["seconds"] for r in rows if r["workers"] == 0}
    print("| n | K | m | measure | how | seconds | / single process | same answer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get((r["n"], r["kc"], r["m"], r["measure"]))
        how = "single process (`store.topk`)" if r["workers"] == 0 else f"LocalCluster, {r['workers']} worker process{'es' if r['workers'] > 1 else ''}"
        ratio = f"{r['seconds'] / ref:.2f}×" if ref else ""
        print(f"| {r['n']:,} | {r['kc']} | {r['m']} | {r['measure']} | {how} | {r['seconds']:.2f} | {ratio} | {r.get('same_answer', '')} |")


if __name__ == "__main__":
    main()
