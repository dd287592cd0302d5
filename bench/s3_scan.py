"""Benchmark of object stores on the Rust path (issue 23; not a test): a compacted store on a real S3 server
on loopback (``s3s-fs``), read and scored by the kernel's own client (rust/src/chunks.rs) against
zarr-python's path (what every object store took before), in the same run.

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python bench/s3_scan.py --n 1M --k 64        # measure, append to bench/_data/s3_scan.jsonl, print the table
    python bench/s3_scan.py --table              # the markdown table of bench/_data/s3_scan.jsonl

The store is built by ``bench/topk.py``'s ``build_store`` (random float32 columns, compacted into (65536, 64)
chunks + crc32c) and copied into the s3s-fs root (s3s-fs serves a bucket's objects from the files of one
folder), then opened as ``s3://bench/s.zarr``. Measured, best of ``--repeat`` after one warm-up pass each:

* server floor: every chunk object fetched by obstore, 8 GETs at a time, bytes dropped;
* scan: one pass of ``iter_row_blocks()`` (2^18-row blocks, prefetch 2), nothing done with the blocks;
  MB/s of float32 delivered;
* topk: ``store.topk("bench", m queries, k=10, measure="cov")`` on an open store, m = 1 and m = 100
  (``rust``: the fused fetch-verify-score pass; ``zarr``: zarr-python reads the blocks, the same Rust kernel
  scores them).

``zarr`` is the store's read path with the Rust reader switched off (``_read.extension`` patched to None,
as ``bench/read_path.py``'s ``engine("zarr")``): only reading changes, the scoring kernel stays the same.
s3s-fs serves from this machine's page cache, so this measures the request path (HTTP, signing, checksums,
decoding), not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_row, write_section  # noqa: E402
from read_path import engine  # noqa: E402  (rust: the store's default; zarr: the read path without the Rust reader)
from topk import DATA, _size, build_store  # noqa: E402  (the bench helpers)

RESULTS = DATA / "s3_scan.jsonl"
K_TOP = 10
MS = (1, 100)
SECTION = "## S3 scan (object stores on the Rust path)"


@contextlib.contextmanager
def s3s_fs(root: Path) -> Iterator[dict]:
    """s3s-fs serving ``root`` on 127.0.0.1 (a free port); yields obstore storage_options."""
    binary = shutil.which("s3s-fs") or str(Path.home() / ".cargo/bin/s3s-fs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench", "--secret-key", "bench-secret",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield {"endpoint": f"http://127.0.0.1:{port}", "access_key_id": "bench", "secret_access_key": "bench-secret",
               "region": "us-east-1", "client_options": {"allow_http": True}}
    finally:
        proc.terminate()
        proc.wait()


def best(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: connections, s3s-fs's page cache
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def server_floor(store, array: str, repeat: int) -> float:
    """MB/s of the server alone: every chunk object of ``array`` fetched by obstore, 8 GETs at a time, nothing
    done with the bytes (the most either engine could read)."""
    import obstore
    from concurrent.futures import ThreadPoolExecutor

    client = store._storage._bulk_store()
    keys = [meta["path"] for batch in obstore.list(client, prefix=f"train/{array}/c/") for meta in batch]
    with ThreadPoolExecutor(8) as pool:
        t, size = best(lambda: sum(len(b) for b in pool.map(lambda k: obstore.get(client, k).bytes(), keys)), repeat)
    return size / t / 1e6


def run(n: int, kc: int, layout: str, repeat: int) -> None:
    import daunce_store

    local = build_store(n, kc, packed=layout == "packed")
    with tempfile.TemporaryDirectory(prefix="s3s-bench-") as tmp:
        root = Path(tmp)
        shutil.copytree(local, root / "bench" / "s.zarr")
        with s3s_fs(root) as options:
            store = daunce_store.open("s3://bench/s.zarr", mode="r", storage_options=options)
            packed = set(store._pack_map()) == set(store.committed_slots())
            assert packed == (layout == "packed"), f"not a {layout} store"
            gb = n * kc * 4 / 1e9
            common = {"n": n, "K": kc, "layout": layout, "runs": repeat}
            append_row(RESULTS, {"what": "server", **common, "mbps": server_floor(store, "packed" if packed else "losses", repeat)})
            answers = {}
            for name in ("rust", "zarr"):
                with engine(name):
                    before = store._storage.chunk_client.gets if store._storage.chunk_client else 0
                    t, _ = best(lambda: sum(1 for _ in store.iter_row_blocks()), repeat)
                    append_row(RESULTS, {"what": "scan", "engine": name, **common, "seconds": t, "mbps": gb * 1e3 / t})
                    for m in MS:
                        queries = [f"q{j}" for j in range(m)]
                        t, res = best(lambda: store.topk("bench", queries, k=K_TOP, measure="cov"), repeat)
                        answers[name, m] = res
                        append_row(RESULTS, {"what": "topk", "engine": name, **common, "m": m, "k": K_TOP, "seconds": t})
                    after = store._storage.chunk_client.gets if store._storage.chunk_client else 0
                    assert (after > before) == (name == "rust"), f"{name}: the Rust client sent {after - before} GETs"
            for m in MS:  # the same answers both ways
                a, b = answers["rust", m], answers["zarr", m]
                for side in ("pos", "neg"):
                    np.testing.assert_array_equal(a.indices[side], b.indices[side])
                    np.testing.assert_allclose(a.scores[side], b.scores[side], rtol=1e-5, atol=1e-6)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    latest: dict[tuple, dict] = {}
    for r in rows:
        if "layout" in r:
            latest[r["what"], r.get("engine"), r["n"], r["K"], r["layout"], r.get("m")] = r
    out = [SECTION, "",
           "Run: `unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; python bench/s3_scan.py --n 1M --k 64` (best of `--repeat` after a "
           f"warm-up). Machine: {machine()}, shared with other sessions (1-min load average per row). The store, compacted "
           "into (65536, 64) chunks + crc32c, is served by `s3s-fs` 0.14.1 on 127.0.0.1 from the page cache: this measures "
           "the request path, not a network. `rust`: the kernel's own object_store client (rust/src/chunks.rs, up to 64 MB "
           "of GETs in flight, crc32c verified, scored as fetched: the fused pass); `zarr`: zarr-python reads the "
           "blocks (every object store before issue 23), the same Rust kernel scores them. Same answers asserted in the run "
           "(bit-equal top-k indices). Layouts: `packed` = compacted, (65536, 64) chunks of 16 MB; `columns` = as appended, "
           "(2^18, 1) chunks of 1 MB per column. `server floor`: the same objects fetched by obstore 8 at a time, nothing done "
           "with them: what s3s-fs serves on this machine, the most either engine can read.", "",
           "| n × K, layout | what | zarr-python (s) | rust (s) | rust / zarr speed-up | MB/s rust, zarr (server floor) | load | date |",
           "|---|---|---|---|---|---|---|---|"]
    order = {"scan": 0, "topk": 1}
    for (what, eng, n, kc, layout, m), r in sorted(latest.items(), key=lambda x: (x[0][2], x[0][3], x[0][4], order.get(x[0][0], 2), x[0][5] or 0)):
        if eng != "rust" or (what, "zarr", n, kc, layout, m) not in latest:
            continue
        z = latest[what, "zarr", n, kc, layout, m]
        floor = latest.get(("server", None, n, kc, layout, None))
        label = "scan (`iter_row_blocks`)" if what == "scan" else f"`topk` cov, m = {m}, k = {r['k']}"
        mbps = f"{r['mbps']:.0f}, {z['mbps']:.0f} ({floor['mbps']:.0f})" if what == "scan" and floor else ""
        out.append(f"| {n:,} × {kc}, {layout} | {label} | {z['seconds']:.3f} | {r['seconds']:.3f} | {z['seconds'] / r['seconds']:.2f}× "
                   f"| {mbps} | {r['load1']}, {z['load1']} | {r['date']} |")
    out += ["", "Reading: the Rust path fetches at the server's pace on both layouts (rust MB/s against the floor). Where the objects "
            "are many and small (as appended: 1 MB per column and row chunk), zarr-python waits on one request after another "
            "and the Rust path is several times faster; on packed 16 MB objects zarr-python already reaches most of what "
            "s3s-fs serves on 2 shared cores, so the scan is bound by the server and the gain is the scoring overlapped with "
            "the fetches (`topk`), not the reading. `s3s-fs` itself: `cargo install s3s-fs --version 0.14.1 --features binary "
            "--locked` took 279 s on this machine (once; .ci/run keeps an installed one)."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1M", help="train rows (default 1M)")
    p.add_argument("--k", type=int, default=64, help="columns (default 64)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layout", nargs="+", choices=["packed", "columns"], default=["packed", "columns"])
    p.add_argument("--table", action="store_true", help="only print the table of the recorded rows")
    args = p.parse_args()
    DATA.mkdir(exist_ok=True)
    if not args.table:
        for layout in args.layout:
            run(_size(args.n), args.k, layout, args.repeat)
    text = table()
    print(text)
    write_section(SECTION, text, Path(__file__).resolve().parent / "RESULTS.md")


if __name__ == "__main__":
    main()
