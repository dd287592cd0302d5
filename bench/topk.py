"""Benchmark of the streaming top-k kernel against its floors and against faiss-cpu (not a test).

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python bench/topk.py --sizes 1M,10M --ks 64,256 --ms 1,100,1000 --k 100

Each measurement runs in its own subprocess so its peak RSS is its own. Data "in RAM" are blocks of
65536 rows sliced from a numpy array (kernel only); data "on disk" are streamed from a daunce store
built under bench/_data/ (reading overlaps compute through the store's prefetch thread). The floors are
the sgemm time of the same shapes (numpy matmul, blocked, no preparation or selection) and the time of
one sequential read of the store. Rows go to bench/_data/topk.jsonl as they finish; ``--table`` prints
the markdown table for bench/RESULTS.md. Delete bench/_data/ afterwards (``--clean``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "_data"
RESULTS = DATA / "topk.jsonl"
BLOCK = 65536


def _size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def _queries(m: int, kc: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((m, kc), dtype=np.float32)


def _ram_data(n: int, kc: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.empty((n, kc), np.float32)
    for r0 in range(0, n, 1 << 20):
        x[r0 : r0 + (1 << 20)] = rng.standard_normal((min(1 << 20, n - r0), kc), dtype=np.float32)
    return x


def store_path(n: int, kc: int, packed: bool = False) -> Path:
    return DATA / f"store_{n}_{kc}{'_packed' if packed else ''}.zarr"


def build_store(n: int, kc: int, packed: bool = False) -> Path:
    """An on-disk store of kc random columns; ``packed``: then compacted into wide chunks (`daunce compact`)."""
    import daunce_store

    path = store_path(n, kc, packed)
    if (path / "_daunce").exists() and daunce_store.open(path, mode="r").num_columns() == kc:
        return path
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    store = daunce_store.init(path, np.arange(n).astype(str), {"bench": [f"q{j}" for j in range(1000)]}, capacity=kc)
    q = _queries(1000, kc)
    for c in range(kc):
        col = np.random.default_rng(100 + c).standard_normal(n, dtype=np.float32)
        store.append(f"p{c}", col, {"bench": q[:, c]})
    if packed:
        store.compact()
    print(f"built {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# --- one measurement (runs in a subprocess) ------------------------------------------------------
def _blocks_ram(x: np.ndarray):
    for r0 in range(0, len(x), BLOCK):
        yield r0, x[r0 : r0 + BLOCK]


def _faiss_topk(x_blocks, q: np.ndarray, k: int, n: int, kc: int):
    """Exact inner-product search on centered rows (cov = <x_c, q_c> / (K - 1)); neg side = negated queries."""
    import faiss

    from daunce_store.scoring import prepare_queries

    xc = np.empty((n, kc), np.float32)
    for r0, b in x_blocks:
        xc[r0 : r0 + len(b)] = b - b.mean(axis=1, dtype=np.float64, keepdims=True).astype(np.float32)
    index = faiss.IndexFlatIP(kc)
    index.add(xc)
    del xc
    qp = prepare_queries(q, "cov")
    d_pos, i_pos = index.search(qp, k)
    d_neg, i_neg = index.search(-qp, k)
    return {"pos": (i_pos, d_pos), "neg": (i_neg, -d_neg)}


def run_one(method: str, where: str, n: int, kc: int, m: int, k: int, repeat: int) -> dict:
    import daunce_store
    from daunce_store.scoring import topk

    q = _queries(m, kc)
    x = _ram_data(n, kc) if where == "ram" else None
    store = daunce_store.open(store_path(n, kc, where == "packed"), mode="r") if where != "ram" else None

    def blocks():
        return _blocks_ram(x) if x is not None else store.iter_row_blocks()

    if method == "numba":  # compile outside the timing
        topk(_blocks_ram(_ram_data(1000, kc)), q, min(k, 1000), backend="numba")
    times = []
    with PeakRSS() as rss:
        for _ in range(repeat):
            t = time.perf_counter()
            if method == "faiss":
                out = _faiss_topk(blocks(), q, k, n, kc)
            elif method == "sgemm":  # floor: the GEMM of the same shapes, nothing else
                for _, b in blocks():
                    b @ q.T
                out = None
            elif method == "read":  # floor: one sequential pass over the store
                for _, b in blocks():
                    pass
                out = None
            else:
                out = topk(blocks(), q, k, "cov", backend=method)
            times.append(time.perf_counter() - t)
    row = {"method": method, "where": where, "n": n, "K": kc, "m": m, "k": k, "seconds": min(times), "runs": len(times), "load1": os.getloadavg()[0],
           "peak_rss_mb": rss.peak / 2**20, "rss_before_mb": rss.base / 2**20}
    if method == "sgemm":
        row["gflops"] = 2 * n * kc * m / min(times) / 1e9
    if method == "read":
        row["gbps"] = n * kc * 4 / min(times) / 1e9
    if out is not None:
        row["first_pos"] = [int(i) for i in out["pos"][0][0, :3]]
    return row


# --- orchestration -----------------------------------------------------------------------------
def _wanted(method: str, where: str, n: int, kc: int, m: int) -> bool:
    """What fits this 2-core machine in an afternoon: the slow baselines only where they take < ~2 min."""
    if method == "read":
        return where != "ram" and m == 1
    if method == "sgemm":
        return where == "ram"
    if method == "numpy":
        return n <= 1_000_000 and (m <= 100 or kc <= 64)
    if method in ("numba", "faiss"):
        return n <= 1_000_000 or m <= 100
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,10M")
    ap.add_argument("--ks", default="64,256")
    ap.add_argument("--ms", default="1,100,1000")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--methods", default="rust,numba,numpy,faiss,sgemm,read")
    ap.add_argument("--where", default="ram,disk,packed", help="ram, disk (per-column store), packed (compacted store)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    ap.add_argument("--one", nargs=6, metavar=("METHOD", "WHERE", "N", "K", "M", "REPEAT"), help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results so far")
    ap.add_argument("--clean", action="store_true", help="delete bench/_data")
    args = ap.parse_args()
    if args.one:
        method, where, n, kc, m, repeat = args.one
        print(json.dumps(run_one(method, where, int(n), int(kc), int(m), args.k, int(repeat))))
        return
    if args.clean:
        shutil.rmtree(DATA, ignore_errors=True)
        return
    if args.table:
        print_table()
        return
    DATA.mkdir(exist_ok=True)
    methods = args.methods.split(",")
    for n in map(_size, args.sizes.split(",")):
        for kc in map(int, args.ks.split(",")):
            for where in args.where.split(","):
                if where != "ram":
                    build_store(n, kc, packed=where == "packed")
                for m in map(int, args.ms.split(",")):
                    for method in methods:
                        if method == "read" and where == "ram" or not _wanted(method, where, n, kc, m):
                            continue
                        repeat = 2 if n * kc * max(m, 10) <= 1_000_000 * 64 * 100 else 1
                        cmd = [sys.executable, __file__, "--k", str(args.k), "--one", method, where, str(n), str(kc), str(m), str(repeat)]
                        try:
                            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                            if proc.returncode != 0:
                                row = {"method": method, "where": where, "n": n, "K": kc, "m": m, "error": proc.stderr[-500:]}
                            else:
                                row = json.loads(proc.stdout.strip().splitlines()[-1])
                        except subprocess.TimeoutExpired:
                            row = {"method": method, "where": where, "n": n, "K": kc, "m": m, "error": f"timeout {args.timeout} s"}
                        row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                        print(json.dumps(row), flush=True)
                        with open(RESULTS, "a") as f:
                            f.write(json.dumps(row) + "\n")


def print_table() -> None:
    rows = [json.loads(line) for line in open(RESULTS)]
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["method"], r["where"], r["n"], r["K"], r["m"])] = r
    cases = sorted({(r["where"], r["n"], r["K"], r["m"]) for r in latest.values()}, key=lambda c: (c[0] != "ram", c[1], c[2], c[3]))
    methods = ["rust", "numba", "numpy", "faiss"]
    print("| data | n | K | m | " + " | ".join(methods) + " | sgemm floor | read floor | rust / floor | faiss / rust | rust peak RSS |")
    print("|---|---|---|---|" + "---|" * (len(methods) + 5))
    for where, n, kc, m in cases:
        get = lambda meth, mm=m: latest.get((meth, where, n, kc, mm))  # noqa: E731
        cells = []
        for meth in methods:
            r = get(meth)
            cells.append("—" if r is None else ("err" if "error" in r else f"{r['seconds']:.3g} s"))
        g = latest.get(("sgemm", "ram", n, kc, m))
        rd = latest.get(("read", where, n, kc, 1))
        floors = [g["seconds"] if g and "error" not in g else None]
        if where != "ram":
            floors.append(rd["seconds"] if rd and "error" not in rd else None)
        floor = max((f for f in floors if f), default=None)
        rust, faiss = get("rust"), get("faiss")
        ratio = f"{rust['seconds'] / floor:.2f}×" if rust and floor and "error" not in rust else "—"
        fr = f"{faiss['seconds'] / rust['seconds']:.1f}×" if rust and faiss and "error" not in faiss and "error" not in rust else "—"
        gcell = f"{g['seconds']:.3g} s ({g['gflops']:.0f} GFLOP/s)" if g and "error" not in g else "—"
        rcell = f"{rd['seconds']:.3g} s ({rd['gbps']:.2f} GB/s)" if where != "ram" and rd and "error" not in rd else "—"
        mem = f"{rust['peak_rss_mb']:.0f} MB" if rust and "error" not in rust else "—"
        print(f"| {where} | {n:,} | {kc} | {m} | " + " | ".join(cells) + f" | {gcell} | {rcell} | {ratio} | {fr} | {mem} |")
    print()
    print("| method | data | n | K | m | peak RSS | RSS before |")
    print("|---|---|---|---|---|---|---|")
    for r in latest.values():
        if "error" not in r and r["method"] in methods and r["m"] == 100:
            print(f"| {r['method']} | {r['where']} | {r['n']:,} | {r['K']} | {r['m']} | {r['peak_rss_mb']:.0f} MB | {r['rss_before_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
