"""Store layout measurements: append cost of one column, full-scan read speed, size on disk.

    python bench/layout.py --n 1000000 --k 64 256            # every layout at n = 1M
    python bench/layout.py --n 10000000 --k 64 --layouts col18 packed64

Data goes under bench/_data/ (git-ignored) and is deleted afterwards. Prints one markdown row per
(layout, codec, read path, K). Reads are warm (the data fits in the page cache; a first scan is not
timed), so they measure the decode path, not the disk.

Layouts (float32 (n, capacity) arrays, as the store makes them):
  col16/col18/col20   per-column chunks (R, 1), R = 2^16/2^18/2^20 (the store's layout: safe for
                      concurrent appends, each append writes its own chunks only)
  grp16/grp64         column-group chunks (2^16, G): an append is a read-modify-write of G-wide chunks,
                      so two writers of one group race (unsafe without a lock)
  shard64             shards (2^16, 64) of inner (2^16, 1) chunks: an append rewrites the shard (unsafe)
  packed64            compaction: columns appended per-column (col16), then packed 64 at a time into a
                      wide (2^16, 64) array that reads like grp64; appends keep the per-column cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

DATA = Path(__file__).with_name("_data") / f"layout-{os.getpid()}"  # own folder: other benches share _data
LAYOUTS = ("col16", "col18", "col20", "grp16", "grp64", "shard64", "packed64")


def codecs(codec: str) -> list:
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4), Crc32cCodec()]
    raise ValueError(codec)


def create(path: Path, layout: str, n: int, cap: int, codec: str) -> zarr.Array:
    common = dict(shape=(n, cap), dtype="float32", fill_value=np.nan, overwrite=True)
    if layout.startswith("col") or layout == "packed64":
        rows = 1 << (16 if layout == "packed64" else int(layout[3:]))
        return zarr.create_array(str(path), chunks=(min(n, rows), 1), compressors=codecs(codec), **common)
    if layout.startswith("grp"):
        return zarr.create_array(str(path), chunks=(min(n, 1 << 16), int(layout[3:])), compressors=codecs(codec), **common)
    if layout == "shard64":
        return zarr.create_array(
            str(path), chunks=(min(n, 1 << 16), 1), shards=(min(n, 1 << 16), 64), compressors=codecs(codec), **common
        )
    raise ValueError(layout)


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # best of: the machine is shared, contention only ever adds time


def fill(arr: zarr.Array, k: int, rng: np.random.Generator) -> None:
    """Write columns 0..k-1 quickly (whole chunk groups at once where the layout allows)."""
    n = arr.shape[0]
    width = arr.chunks[1] if arr.chunks[1] > 1 else 64
    rows = 1 << 20
    for c0 in range(0, k, width):
        c1 = min(c0 + width, k)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            arr[r0:r1, c0:c1] = rng.standard_normal((r1 - r0, c1 - c0), dtype=np.float32)


def read_wide(arr: zarr.Array, k: int, rows: int) -> None:
    for r0 in range(0, arr.shape[0], rows):
        block = arr[r0 : min(r0 + rows, arr.shape[0]), :k]
        assert block.shape[1] == k


def read_percol(arr: zarr.Array, k: int, rows: int, threads: int = 0) -> None:
    """The store's path: one 1-d read per column into a (K, R) buffer, then a transpose."""
    n = arr.shape[0]
    pool = ThreadPoolExecutor(threads) if threads else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        buf = np.empty((k, r1 - r0), dtype=np.float32)

        def one(j: int, r0: int = r0, r1: int = r1, buf: np.ndarray = buf) -> None:
            buf[j] = arr[r0:r1, j]

        if pool is None:
            for j in range(k):
                one(j)
        else:
            list(pool.map(one, range(k)))
        np.ascontiguousarray(buf.T)
    if pool is not None:
        pool.shutdown()


def read_packed(packed: zarr.Array, young: zarr.Array, k: int, young_k: int, rows: int) -> None:
    """Compacted store: wide reads of the packed columns plus per-column reads of the young ones."""
    n = packed.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        out = np.empty((r1 - r0, k + young_k), dtype=np.float32)
        out[:, :k] = packed[r0:r1, :k]
        for j in range(young_k):
            out[:, k + j] = young[r0:r1, k + j]


def bench_store(n: int, ks: list[int], pipelines: list[str], block_rows: list[int]) -> None:
    """The real store end to end: LossStore.append per column, iter_row_blocks scans before and after
    `compact` (K = 64 and 256 columns; the scan consumer only touches each block)."""
    import daunce_store

    path = DATA / "store.zarr"
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(1)
    try:
        store = daunce_store.init(path, np.arange(n), capacity=1024)
        row(["store path", "pipeline", "K", "block rows", "append 1 col (s)", "compact 64 cols (s)", "scan GB/s", "size (GB)"])
        row(["---"] * 8)
        appended, append_s = 0, []
        for k in sorted(ks):
            while appended < k:
                col = rng.standard_normal(n, dtype=np.float32)
                t = time.perf_counter()
                store.append(f"p{appended}", col)
                append_s.append(time.perf_counter() - t)
                appended += 1
            for label in ("per-column", "compacted"):
                compact_s = ""
                if label == "compacted":
                    t = time.perf_counter()
                    groups = store.compact()
                    if groups:
                        compact_s = f"{(time.perf_counter() - t) / len(groups):.2f}"
                for pipeline in pipelines:
                    for rows in block_rows:
                        cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"} if pipeline == "zarrs" else {}
                        with zarr.config.set(cfg):
                            reader = daunce_store.open(path, mode="r")

                            def scan() -> None:
                                for _, block in reader.iter_row_blocks(block_rows=rows):
                                    block[0, 0]

                            scan()
                            s = timed(scan, repeat=2)
                        row([label, pipeline, k, rows, f"{statistics.median(append_s):.3f}", compact_s,
                             f"{n * k * 4 / s / 1e9:.2f}", f"{du(path) / 1e9:.2f}"])
    finally:
        shutil.rmtree(path, ignore_errors=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def row(cells: list) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--codecs", nargs="+", default=["none"], choices=["none", "lz4"])
    ap.add_argument("--pipelines", nargs="+", default=["zarr", "zarrs"], choices=["zarr", "zarrs"])
    ap.add_argument("--read-rows", type=int, nargs="+", default=[1 << 18], help="rows per block of a full scan")
    ap.add_argument("--json", type=Path, default=None, help="also append results here (JSON lines)")
    ap.add_argument("--store", action="store_true", help="measure the real LossStore (append, scan, compact) instead")
    args = ap.parse_args()
    if args.store:
        DATA.mkdir(parents=True, exist_ok=True)
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} LossStore n={args.n}, load avg {os.getloadavg()[0]:.1f}", flush=True)
        try:
            bench_store(args.n, args.k, args.pipelines, args.read_rows)
        finally:
            shutil.rmtree(DATA, ignore_errors=True)
        return

    DATA.mkdir(parents=True, exist_ok=True)
    kmax = max(args.k)
    cap = max(256, kmax + 64)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"zarr {zarr.__version__}, n={args.n}, K={args.k}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    row(["layout", "codec", "pipeline", "K", "append 1 col (s)", "read path", "scan GB/s", "size/col (MB)", "size ratio"])
    row(["---"] * 9)
    rng = np.random.default_rng(0)
    results = []
    for codec in args.codecs:
        for layout in args.layouts:
            path = DATA / f"{layout}-{codec}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            try:
                arr = create(path, layout, args.n, cap, codec)
                t = time.perf_counter()
                fill(arr, kmax, rng)
                fill_s = time.perf_counter() - t
                size = du(path)
                col = rng.standard_normal(args.n, dtype=np.float32)
                # Append = writing one new column (what a worker does per perturbation); for groups and
                # shards the column lands in a partly filled group (read-modify-write of its chunks).
                slots = iter(range(kmax, cap))
                append_s = timed(lambda: arr.__setitem__((slice(None), next(slots)), col))
                packed = None
                if layout == "packed64":
                    packed = create(DATA / f"{layout}-{codec}-packed.zarr", "grp64", args.n, cap, codec)
                    t = time.perf_counter()
                    for c0 in range(0, kmax, 64):  # what `compact` does: per-column -> wide, 64 at a time
                        for r0 in range(0, args.n, 1 << 16):
                            r1 = min(r0 + (1 << 16), args.n)
                            block = np.empty((r1 - r0, 64), np.float32)
                            for j in range(64):
                                block[:, j] = arr[r0:r1, c0 + j]
                            packed[r0:r1, c0 : c0 + 64] = block
                    compact_s = (time.perf_counter() - t) / (kmax / 64)
                    size += du(DATA / f"{layout}-{codec}-packed.zarr")  # both copies (young chunks kept)
                for pipeline in args.pipelines:
                    cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"} if pipeline == "zarrs" else {}
                    with zarr.config.set(cfg):
                        a = zarr.open_array(str(path), mode="r")
                        p = zarr.open_array(str(DATA / f"{layout}-{codec}-packed.zarr"), mode="r") if packed is not None else None
                        for k in args.k:
                            paths: dict[str, object] = {}
                            if layout.startswith("col"):
                                paths["per-column"] = lambda: read_percol(a, k, args.read_rows[0])
                                paths["per-column, 4 threads"] = lambda: read_percol(a, k, args.read_rows[0], threads=4)
                            elif layout == "packed64":
                                paths["packed + 0 young"] = lambda: read_packed(p, a, k, 0, args.read_rows[0])
                                paths["packed + 63 young"] = lambda: read_packed(p, a, k - 64, 63, args.read_rows[0])
                            else:
                                paths["wide"] = lambda: read_wide(a, k, args.read_rows[0])
                            for name, fn in paths.items():
                                fn()  # warm the page cache
                                s = timed(fn, repeat=2)
                                gbs = args.n * k * 4 / s / 1e9
                                extra = f"compact 64 cols: {compact_s:.2f} s" if packed is not None else ""
                                row([layout, codec, pipeline, k, f"{append_s:.3f}", name, f"{gbs:.2f}",
                                     f"{size / kmax / 1e6:.2f}", f"{size / (args.n * kmax * 4):.3f}"])
                                results.append(dict(layout=layout, codec=codec, pipeline=pipeline, k=k, n=args.n,
                                                    append_s=append_s, read=name, gbs=gbs, bytes=size, fill_s=fill_s,
                                                    compact_s=compact_s if packed is not None else None, note=extra))
            finally:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(DATA / f"{layout}-{codec}-packed.zarr", ignore_errors=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    shutil.rmtree(DATA, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
