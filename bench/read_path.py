"""Benchmark of the store's read path (issue 15, "Feed the kernel at memory speed"; not a test).

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python bench/read_path.py                     # 1M x {64, 256} x m {1, 100, 1000}, 10M x 64 x m {1, 100}, then the table
    python bench/read_path.py --table             # the markdown table of bench/_data/read_path.jsonl
    python bench/topk.py --clean                  # delete bench/_data (the stores are shared with topk.py)

Measures, on compacted stores built by ``bench/topk.py``'s ``build_store`` (random float32 columns, packed
into (65536, 64) chunks; page cache warm, so these are decode-path numbers):

* scan: one pass of ``iter_row_blocks()`` (defaults: 2^18-row blocks, prefetch 2) doing nothing with the
  blocks, GB/s of float32 delivered; engine ``rust`` (``_kernel.read_block``) and ``zarr`` (zarr-python,
  what ``DAUNCE_STORE_NO_EXT=1`` and object stores use), best of ``--repeat`` after one warm-up pass;
  also the rust scan in the blocks the scoring path uses (``scan_block_rows``: 2^16 rows when compacted);
* topk: end-to-end ``store.topk(set, m queries, k=10, measure="cov", side="both")`` on an open store, best
  of ``--repeat`` (the fused read-and-score pass; ``block path``: the same with ``DAUNCE_STORE_FUSED=0``,
  blocks read and then scored), against the floors: sgemm (numpy matmul of the same 65536-row blocks held in RAM by
  the queries, nothing else) and read (the faster of the two rust scans above). The breakdown, each
  timed on its own (best of ``--repeat``): ``request`` (snapshot, listings, query losses: what topk
  does before the scan), ``kernel`` (the accumulator fed the same blocks from RAM: prepare, GEMM,
  selection, finish), ``scan+kernel`` (the accumulator fed from the store, the prefetch thread reading
  ahead), ``naming`` (``train_ids_at`` of the listed rows);
* latency (m = 1 and 100, k = 10, cov): the whole ``daunce topk --format json`` process (and python +
  imports alone), and ``store.topk`` on a store opened just before (first call) and again (second call),
  best of ``--repeat``; each against the same case's max(sgemm floor, read floor);
* default measures (issue 23): ``store.topk`` under ``auto`` and ``auto-corr`` (no recorded draws here:
  whitened and whitened-corr) against cov in the same run, on an open read-only handle whose K × K matrix
  comes from the store's persisted record (written once by ``persist_matrices``, timed as ``persist``), and
  ``auto-corr`` scored with its persisted row scales (cov rows times a scale per row) and, in the same run,
  without them (``auto-corr, transform``: the kernel multiplies each row by M^½ in the pass, what a store
  without them gets); and the whole ``daunce topk`` process under each measure (the default is ``auto-corr``).
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
from _results import append_row  # noqa: E402
from topk import BLOCK, DATA, _queries, _ram_data, _size, build_store  # noqa: E402  (the bench helpers)

from daunce_store.scoring._attribution import kernel_queries, scan_block_rows, scoring_request  # noqa: E402
from daunce_store.scoring._backend import make_accumulator  # noqa: E402

RESULTS = DATA / "read_path.jsonl"
K_TOP = 10
LATENCY_MS = (1, 100)  # queries per interactive call: one, and a batch


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


def without_row_scales(path: Path, measure: str):
    """A fresh read-only handle that scores ``measure`` (a -corr one) as a store without persisted row scales
    does: its cache says there are none, so the kernel transforms each row in the pass."""
    import daunce_store
    from daunce_store.scoring._measures import resolve_measure

    store = daunce_store.open(path, mode="r")
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap, query_set="bench")
    store.derived_cache[("row-scales", resolve_measure(measure, snap, slots).preconditioner, tuple(slots))] = None
    return store


def run_size(n: int, kc: int, ms: list[int], repeat: int, latency: bool) -> None:
    import daunce_store

    path = build_store(n, kc, packed=True)
    writer = daunce_store.open(path)  # the first writable reader persists the default measures' matrices
    t = time.perf_counter()
    writer.persist_matrices()
    append_row(RESULTS, {"what": "persist", "n": n, "K": kc, "seconds": time.perf_counter() - t})
    store = daunce_store.open(path, mode="r")
    assert store._pack_map() and set(store._pack_map()) == set(store.committed_slots()), "not fully compacted"
    gb = n * kc * 4 / 1e9
    scan(store)  # warm the page cache
    floors = {}
    for name in ("rust", "zarr"):
        with engine(name):
            t = best(lambda: scan(store), repeat)
        floors[name] = t
        append_row(RESULTS, {"what": "scan", "engine": name, "n": n, "K": kc, "seconds": t, "gbps": gb / t, "runs": repeat})
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap)
    rows = scan_block_rows(store.rows(slots=slots))
    t = best(lambda: [None for _ in store.iter_row_blocks(block_rows=rows)], repeat)
    append_row(RESULTS, {"what": "scan", "engine": "rust", "block_rows": rows, "n": n, "K": kc, "seconds": t, "gbps": gb / t, "runs": repeat})
    read_floor = min(floors["rust"], t)
    x = _ram_data(n, kc)
    for m in ms:
        q = _queries(m, kc)
        t_gemm = best(lambda: [x[r0 : r0 + BLOCK] @ q.T for r0 in range(0, n, BLOCK)], repeat)
        queries = [f"q{j}" for j in range(m)]
        t_topk = best(lambda: store.topk("bench", queries, k=K_TOP, measure="cov"), repeat)
        # The default measures, in the same run: a fresh read-only handle per call (its K x K matrix read
        # from the store's record, as a new process would), interleaved with cov to share the load.
        t_measures = {measure: best(lambda: daunce_store.open(path, mode="r").topk("bench", queries, k=K_TOP, measure=measure), repeat)
                      for measure in ("cov", "auto", "auto-corr")}
        t_measures["auto-corr, transform"] = best(lambda: without_row_scales(path, "auto-corr").topk("bench", queries, k=K_TOP, measure="auto-corr"), repeat)
        os.environ["DAUNCE_STORE_FUSED"] = "0"  # the same call on the block path (read blocks, then score them)
        try:
            t_blocks = best(lambda: store.topk("bench", queries, k=K_TOP, measure="cov"), repeat)
        finally:
            del os.environ["DAUNCE_STORE_FUSED"]
        result = store.topk("bench", queries, k=K_TOP, measure="cov")
        listed = np.unique(np.concatenate([i.ravel() for i in result.indices.values()]))
        t_names = best(lambda: store.train_ids_at(listed), repeat)
        # The breakdown: what topk_store does, step by step, each step timed alone.
        t_req = best(lambda: scoring_request(store, "bench", queries, K_TOP, "cov", "both", None), repeat)
        req = scoring_request(store, "bench", queries, K_TOP, "cov", "both", None)
        prep = req.prepared()
        kq, prepared, _ = kernel_queries(req, prep, "bench", queries, None)

        def fed(blocks) -> None:
            acc = make_accumulator(kq, K_TOP, prep.kernel, req.sides, "auto", queries_prepared=prepared)
            for offset, block in blocks:
                acc.push_block(offset, block)
            acc.finish()

        t_pipe = best(lambda: fed(req.blocks(store)), repeat)
        held = [(o, b.copy()) for o, b in req.blocks(store)]
        t_kernel = best(lambda: fed(held), repeat)
        del held
        floor = max(t_gemm, read_floor)
        append_row(RESULTS, {"what": "topk", "n": n, "K": kc, "m": m, "k": K_TOP, "seconds": t_topk, "sgemm_floor": t_gemm,
                 "gflops": 2 * n * kc * m / t_gemm / 1e9, "read_floor": read_floor, "vs_floor": t_topk / floor, "blocks_seconds": t_blocks,
                 "block_rows": rows, "request_seconds": t_req, "kernel_seconds": t_kernel, "pipeline_seconds": t_pipe,
                 "naming_seconds": t_names, "named_rows": int(len(listed)), "runs": repeat,
                 "fresh_seconds": t_measures})
    del x
    if latency:
        for m in LATENCY_MS:
            queries = [f"q{j}" for j in range(m)]
            times: dict[str, list[float]] = {"cov": [], "auto": [], "auto-corr": []}
            for _ in range(repeat):  # the measures interleaved, so the machine's load falls on each alike
                for measure in times:
                    cmd = [sys.executable, "-m", "daunce_store.cli", "topk", str(path), "--query-set", "bench",
                           *[a for q in queries for a in ("--query", q)], "-k", str(K_TOP), "--measure", measure, "--format", "json"]
                    if shutil.which("daunce"):
                        cmd = ["daunce", *cmd[3:]]
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    times[measure].append(time.perf_counter() - t)
                    assert proc.returncode == 0, proc.stderr[-2000:]
            append_row(RESULTS, {"what": "latency", "how": "daunce topk process", "n": n, "K": kc, "m": m, "seconds": min(times["cov"]), "runs": repeat})
            append_row(RESULTS, {"what": "measures", "how": "daunce topk process", "n": n, "K": kc, "m": m,
                                 "seconds": {k: min(v) for k, v in times.items()}, "runs": repeat})
            firsts, seconds = [], []
            for _ in range(repeat):  # a fresh handle each time: its first call reads the records, the second reuses them
                opened = daunce_store.open(path, mode="r")
                firsts.append(best(lambda: opened.topk("bench", queries, k=K_TOP, measure="cov"), 1))
                seconds.append(best(lambda: opened.topk("bench", queries, k=K_TOP, measure="cov"), 1))
            for call, ts in (("first", firsts), ("second", seconds)):
                append_row(RESULTS, {"what": "latency", "how": f"store.topk on an open store, {call} call", "n": n, "K": kc, "m": m, "seconds": min(ts), "runs": repeat})
        t = best(lambda: subprocess.run([sys.executable, "-c", "import daunce_store.cli"], check=True), repeat)
        append_row(RESULTS, {"what": "latency", "how": "of which: python + imports (`import daunce_store.cli`)", "n": n, "K": kc, "seconds": t, "runs": repeat})


def print_table() -> None:
    latest: dict[tuple, dict] = {}
    for line in open(RESULTS):
        r = json.loads(line)
        latest[(r["what"], r.get("engine"), r.get("how"), r.get("block_rows") if r["what"] == "scan" else None, r["n"], r["K"], r.get("m"))] = r
    rows = list(latest.values())
    print("**Warm compacted scan** (`iter_row_blocks()`: 2^18-row blocks, prefetch 2; `scoring blocks`: the blocks "
          "topk reads, `scan_block_rows`):\n")
    print("| n | K | GB | rust reader | rust reader, scoring blocks | zarr-python | rust / zarr | load1 |")
    print("|---|---|---|---|---|---|---|---|")
    cell = lambda r: f"{r['seconds']:.3g} s ({r['gbps']:.2f} GB/s)" if r else "—"  # noqa: E731
    for (n, kc) in sorted({(r["n"], r["K"]) for r in rows if r["what"] == "scan"}):
        rs = latest.get(("scan", "rust", None, None, n, kc, None))
        zs = latest.get(("scan", "zarr", None, None, n, kc, None))
        bs = [r for r in rows if r["what"] == "scan" and r.get("block_rows") and (r["n"], r["K"]) == (n, kc)]
        sb = f"{cell(bs[-1])}, 2^{bs[-1]['block_rows'].bit_length() - 1} rows" if bs else "—"
        ratio = f"{zs['seconds'] / rs['seconds']:.1f}×" if rs and zs else "—"
        print(f"| {n:,} | {kc} | {n * kc * 4 / 1e9:.2f} | {cell(rs)} | {sb} | {cell(zs)} | {ratio} | {rs['load1'] if rs else '—'} |")
    print(f"\n**End-to-end `store.topk`** (cov, k = {K_TOP}, both sides, compacted store, open handle; read floor = the "
          "faster scan above; the last four columns time topk's steps one at a time):\n")
    print("| n | K | m | topk | sgemm floor | read floor | topk / max(floors) | block path | request | kernel from RAM | scan + kernel | naming (rows) | load1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["what"] == "topk"), key=lambda r: (r["n"], r["K"], r["m"])):
        blocks = f"{r['blocks_seconds']:.3g} s" if "blocks_seconds" in r else "—"
        extra = (f"{r['request_seconds']:.3g} s | {r['kernel_seconds']:.3g} s | {r['pipeline_seconds']:.3g} s"
                 if "request_seconds" in r else "— | — | —")
        print(f"| {r['n']:,} | {r['K']} | {r['m']} | {r['seconds']:.3g} s | {r['sgemm_floor']:.3g} s ({r['gflops']:.0f} GFLOP/s) | "
              f"{r['read_floor']:.3g} s | {r['vs_floor']:.2f}× | {blocks} | {extra} | {r['naming_seconds']:.3g} s ({r['named_rows']}) | {r['load1']} |")
    lat = [r for r in rows if r["what"] == "latency" and ("m" in r or r["how"].startswith("of which"))]  # rows before m was kept: m = 1
    if lat:
        print(f"\n**Interactive latency**, k = {K_TOP}, cov (floor: max(sgemm, read) of the same n, K, m above):\n")
        print("| n | K | m | how | seconds | / floor | load1 |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(lat, key=lambda r: r.get("m", 1e9)):
            top = latest.get(("topk", None, None, None, r["n"], r["K"], r.get("m")))
            floor = f"{r['seconds'] / max(top['sgemm_floor'], top['read_floor']):.2f}×" if top else "—"
            print(f"| {r['n']:,} | {r['K']} | {r.get('m', '—')} | {r['how']} | {r['seconds']:.3g} | {floor} | {r['load1']} |")


def print_measures_table(rows: list[dict]) -> None:
    """Issue 23's table: the default measures against cov, as ratios within one run."""
    print(f"\n**Default measures against cov** (k = {K_TOP}, both sides, compacted store; `auto` = whitened and `auto-corr` = "
          "whitened-corr here (no recorded draws), their K × K matrix read from the store's persisted record; "
          "`store.topk`: a fresh read-only handle per call; process: the whole `daunce topk --format json`; "
          "/ sgemm: against the sgemm floor of the same n, K, m):\n")
    print("| n | K | m | how | cov | auto | auto / cov | auto-corr (default) | auto-corr / cov | auto-corr, transform (no row scales) | / cov | cov / sgemm | auto / sgemm | auto-corr / sgemm | load1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines, tops = [], {}
    for r in rows:  # in file order: a process row goes with the sgemm floor measured just before it, in its run
        if r["what"] == "topk":
            tops[(r["n"], r["K"], r["m"])] = r
            if "fresh_seconds" in r:
                lines.append((r, "store.topk", r))
        elif r["what"] == "measures":
            lines.append((r, "process", tops.get((r["n"], r["K"], r["m"]))))
    for r, how, top in sorted(lines, key=lambda x: (x[0]["n"], x[0]["K"], x[0]["m"], x[1], x[0]["date"])):
        t = r["fresh_seconds"] if how == "store.topk" else r["seconds"]
        floor = lambda x: f"{x / top['sgemm_floor']:.2f}×" if top else "—"  # noqa: E731
        tr = t.get("auto-corr, transform")
        transform = f"{tr:.3g} s | {tr / t['cov']:.2f}×" if tr else "— | —"
        print(f"| {r['n']:,} | {r['K']} | {r['m']} | {how} | {t['cov']:.3g} s | {t['auto']:.3g} s | {t['auto'] / t['cov']:.2f}× | "
              f"{t['auto-corr']:.3g} s | {t['auto-corr'] / t['cov']:.2f}× | {transform} | {floor(t['cov'])} | {floor(t['auto'])} | {floor(t['auto-corr'])} | {r['load1']} |")
    for r in rows:
        if r["what"] == "persist":
            print(f"\n(persisting the matrix (and, since the row-scales change, the -corr row scales), once per column set: "
                  f"{r['seconds']:.3g} s at {r['n']:,} × {r['K']}, load1 {r['load1']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1M:64:1/100/1000,1M:256:1/100/1000,10M:64:1/100", help="n:K:m/m/... triples")
    ap.add_argument("--repeat", type=int, default=3, help="timings per measurement (best is kept); 2 at 10M")
    ap.add_argument("--latency-at", default="10M:64", help="the n:K case that also gets the interactive latency")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results so far")
    args = ap.parse_args()
    if args.table:
        print_table()
        print_measures_table([json.loads(line) for line in open(RESULTS)])
        return
    DATA.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for case in args.cases.split(","):
        n_s, k_s, m_s = case.split(":")
        n, kc = _size(n_s), int(k_s)
        repeat = args.repeat if n < 10_000_000 else min(args.repeat, 2)
        run_size(n, kc, [int(m) for m in m_s.split("/")], repeat, latency=f"{n_s}:{k_s}" == args.latency_at)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_table()
    print_measures_table([json.loads(line) for line in open(RESULTS)])


if __name__ == "__main__":
    main()
