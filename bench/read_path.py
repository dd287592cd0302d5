"""Benchmark of the store's read path (issue 15, "Feed the kernel at memory speed"; not a test).

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python bench/read_path.py                     # 1M x {64, 256} and 10M x 64, then the table
    python bench/read_path.py --table             # the markdown table of bench/_data/read_path.jsonl
    python bench/topk.py --clean                  # delete bench/_data (the stores are shared with topk.py)

Measures, on compacted stores built by ``bench/topk.py``'s ``build_store`` (random float32 columns, packed
into (65536, 64) chunks; page cache warm, so these are decode-path numbers):

* scan: one pass of ``iter_row_blocks()`` (defaults: 2^18-row blocks, prefetch 2) doing nothing with the
  blocks, GB/s of float32 delivered; engine ``rust`` (``_kernel.read_block``) and ``zarr`` (zarr-python,
  what ``DAUNCE_STORE_NO_EXT=1`` and object stores use), best of ``--repeat`` after one warm-up pass;
* topk: end-to-end ``store.topk(set, m queries, k=10, measure="cov", side="both")`` on an open store, best
  of ``--repeat``, against the floors: sgemm (numpy matmul of the same 65536-row blocks held in RAM by
  the queries, nothing else) and read (the rust scan above); ``naming`` is the part of it that reads the
  listed rows' ids (``train_ids_at`` on a fresh handle);
* latency (m = 1, k = 10, cov): the whole ``daunce topk`` process, and ``store.topk`` on a store opened
  just before (first call) and again (second call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topk import BLOCK, DATA, _queries, _ram_data, _size, build_store, store_path  # noqa: E402  (the bench helpers)

RESULTS = DATA / "read_path.jsonl"
K_TOP = 10


def _record(row: dict) -> None:
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    row["load1"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    """``rust``: the store's default on a local disk; ``zarr``: the read path without the Rust reader
    (only reading changes; the scoring kernel stays the extension's)."""
    import daunce_store.store._read as read

    real = read.extension
    if name == "zarr":
        read.extension = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        read.extension = real  # type: ignore[assignment]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def scan(store) -> None:
    for _ in store.iter_row_blocks():
        pass


def run_size(n: int, kc: int, ms: list[int], repeat: int, latency: bool) -> None:
    import daunce_store

    path = build_store(n, kc, packed=True)
    store = daunce_store.open(path, mode="r")
    assert store._pack_map() and set(store._pack_map()) == set(store.committed_slots()), "not fully compacted"
    gb = n * kc * 4 / 1e9
    scan(store)  # warm the page cache
    floors = {}
    for name in ("rust", "zarr"):
        with engine(name):
            t = best(lambda: scan(store), repeat)
        floors[name] = t
        _record({"what": "scan", "engine": name, "n": n, "K": kc, "seconds": t, "gbps": gb / t, "runs": repeat})
    x = _ram_data(n, kc)
    for m in ms:
        q = _queries(m, kc)
        t_gemm = best(lambda: [x[r0 : r0 + BLOCK] @ q.T for r0 in range(0, n, BLOCK)], repeat)
        queries = [f"q{j}" for j in range(m)]
        t_topk = best(lambda: store.topk("bench", queries, k=K_TOP, measure="cov"), repeat)
        result = store.topk("bench", queries, k=K_TOP, measure="cov")
        listed = np.unique(np.concatenate([i.ravel() for i in result.indices.values()]))
        fresh = daunce_store.open(path, mode="r")
        t_names = best(lambda: fresh.train_ids_at(listed), 1)
        floor = max(t_gemm, floors["rust"])
        _record({"what": "topk", "n": n, "K": kc, "m": m, "k": K_TOP, "seconds": t_topk, "sgemm_floor": t_gemm,
                 "gflops": 2 * n * kc * m / t_gemm / 1e9, "read_floor": floors["rust"], "vs_floor": t_topk / floor,
                 "naming_seconds": t_names, "named_rows": int(len(listed)), "runs": repeat})
    del x
    if latency:
        cmd = [sys.executable, "-m", "daunce_store.cli", "topk", str(path), "--query-set", "bench", "--query", "q0",
               "-k", str(K_TOP), "--measure", "cov", "--format", "json"]
        if shutil.which("daunce"):
            cmd = ["daunce", *cmd[3:]]
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            assert proc.returncode == 0, proc.stderr[-2000:]
        _record({"what": "latency", "how": "daunce topk process", "n": n, "K": kc, "seconds": min(times), "runs": repeat})
        opened = daunce_store.open(path, mode="r")
        for call in ("first", "second"):
            t = best(lambda: opened.topk("bench", ["q0"], k=K_TOP, measure="cov"), 1)
            _record({"what": "latency", "how": f"store.topk on an open store, {call} call", "n": n, "K": kc, "seconds": t, "runs": 1})


def print_table() -> None:
    latest: dict[tuple, dict] = {}
    for line in open(RESULTS):
        r = json.loads(line)
        latest[(r["what"], r.get("engine"), r.get("how"), r["n"], r["K"], r.get("m"))] = r
    rows = list(latest.values())
    print("**Warm compacted scan** (`iter_row_blocks()`, 2^18-row blocks, prefetch 2):\n")
    print("| n | K | GB | rust reader | zarr-python | rust / zarr |")
    print("|---|---|---|---|---|---|")
    for (n, kc) in sorted({(r["n"], r["K"]) for r in rows if r["what"] == "scan"}):
        rs = latest.get(("scan", "rust", None, n, kc, None))
        zs = latest.get(("scan", "zarr", None, n, kc, None))
        cell = lambda r: f"{r['seconds']:.3g} s ({r['gbps']:.2f} GB/s)" if r else "—"  # noqa: E731
        ratio = f"{zs['seconds'] / rs['seconds']:.1f}×" if rs and zs else "—"
        print(f"| {n:,} | {kc} | {n * kc * 4 / 1e9:.2f} | {cell(rs)} | {cell(zs)} | {ratio} |")
    print(f"\n**End-to-end `store.topk`** (cov, k = {K_TOP}, both sides, compacted store, open handle):\n")
    print("| n | K | m | topk | sgemm floor | read floor | topk / max(floors) | of which naming (rows) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["what"] == "topk"), key=lambda r: (r["n"], r["K"], r["m"])):
        print(f"| {r['n']:,} | {r['K']} | {r['m']} | {r['seconds']:.3g} s | {r['sgemm_floor']:.3g} s ({r['gflops']:.0f} GFLOP/s) | "
              f"{r['read_floor']:.3g} s | {r['vs_floor']:.2f}× | {r['naming_seconds']:.3g} s ({r['named_rows']}) |")
    lat = [r for r in rows if r["what"] == "latency"]
    if lat:
        print(f"\n**Interactive latency**, m = 1, k = {K_TOP}, cov:\n")
        print("| n | K | how | seconds |")
        print("|---|---|---|---|")
        for r in lat:
            print(f"| {r['n']:,} | {r['K']} | {r['how']} | {r['seconds']:.3g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1M:64,1M:256,10M:64", help="n:K pairs")
    ap.add_argument("--ms", default="1,100")
    ap.add_argument("--repeat", type=int, default=3, help="timings per measurement (best is kept); 2 at 10M")
    ap.add_argument("--latency-at", default="10M:64", help="the n:K case that also gets the interactive latency")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results so far")
    args = ap.parse_args()
    if args.table:
        print_table()
        return
    DATA.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for case in args.cases.split(","):
        n_s, k_s = case.split(":")
        n, kc = _size(n_s), int(k_s)
        repeat = args.repeat if n < 10_000_000 else min(args.repeat, 2)
        run_size(n, kc, [int(m) for m in args.ms.split(",")], repeat, latency=case == args.latency_at)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_table()


if __name__ == "__main__":
    main()
