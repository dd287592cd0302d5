"""What the preconditioned measures cost over plain cov (not a test).

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python bench/measures.py --n 1M --K 64 --m 100 --k 100

Builds (once, under bench/_data/) a compacted store of K random columns whose commits record their
perturbation draws (ratio 0.3), then times, in one process and one run, ``store.topk`` under cov,
whitened, nystrom and nystrom-corr: the first call on a fresh handle (it makes the extra pass that
accumulates the K × K matrix; for nystrom that pass also regenerates every perturbation's weights) and
a second call on the same handle (the matrix is cached). Each time is reported with its ratio to cov in
the same run. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "_data"


def _size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def build(n: int, kc: int, m: int) -> Path:
    import daunce_store
    from daunce_store.store import PerturbationDraw

    path = DATA / f"measures_{n}_{kc}.zarr"
    if (path / "_daunce").exists() and daunce_store.open(path, mode="r").num_columns() == kc:
        return path
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    store = daunce_store.init(path, np.arange(n).astype(str), {"bench": [f"q{j}" for j in range(m)]}, capacity=kc, seed=1)
    q = np.random.default_rng(1).standard_normal((m, kc), dtype=np.float32)
    for c in range(kc):
        col = np.random.default_rng(100 + c).standard_normal(n, dtype=np.float32)
        draw = PerturbationDraw(1, c, 0.3)
        store.append(f"{c:06d}", col, {"bench": q[:, c]}, metadata={"draw": draw.to_metadata()})
    store.compact()
    print(f"built {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1M")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import daunce_store

    n = _size(args.n)
    path = build(n, args.K, args.m)
    rows = []
    for measure in ("cov", "whitened", "nystrom", "nystrom-corr"):
        firsts, cached = [], []
        for _ in range(args.repeats):
            store = daunce_store.open(path, mode="r")  # a fresh handle: no cached matrix
            firsts.append(timed(lambda: store.topk("bench", k=args.k, measure=measure)))
            cached.append(timed(lambda: store.topk("bench", k=args.k, measure=measure)))
        rows.append((measure, min(firsts), min(cached)))
    base = rows[0][2]
    print(f"\n{platform.machine()}, {platform.python_version()}, n={n}, K={args.K}, m={args.m}, k={args.k}, "
          f"best of {args.repeats}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| measure | first call (s) | × cov | matrix cached (s) | × cov |")
    print("|---|---|---|---|---|")
    for measure, first, again in rows:
        print(f"| {measure} | {first:.3f} | {first / base:.2f} | {again:.3f} | {again / base:.2f} |")


if __name__ == "__main__":
    main()
