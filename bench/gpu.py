"""GPU benchmark of the torch scoring backend (not a test): one script, one card, under ~8 minutes on an H100.

    python bench/gpu.py                 # full size: n = 10M, K = 64 and 256, m = 100 and 1000, k = 100
    python bench/gpu.py --small         # smoke run (n = 200k, small K and m): runs on CPU too, appends nothing

What it measures, cov, both sides (pos and neg), data in host RAM (a numpy array sliced in blocks of
65536 rows, as the store hands them out; the store read itself is not included, see "Top-k kernel"):

* host → device bandwidth, pageable (``torch.from_numpy(a).to(dev)``) and pinned (``non_blocking``), and
  device-to-device copy bandwidth (HBM, read + write counted);
* ``torch streamed``: ``make_accumulator(backend="torch")``, every block staged through pinned memory
  and copied on a side stream while the previous block is scored, against the PCIe floor
  (n·K·4 bytes / measured pinned bandwidth);
* ``torch resident``: ``TorchScorer`` holding the prepared (n, K) matrix on the device (build time apart),
  one query batch, against the HBM floor (n·K·4 bytes read once / measured HBM bandwidth) and the bare
  matmul of the same tiles (GEMM only, no selection);
* the Rust CPU kernel at one size (10M × 64 × m = 100) as the baseline, and whether its indices agree;
* faiss-gpu brute force (``GpuIndexFlatIP`` on centered rows, neg side = negated queries, search only) if
  faiss imports with a GPU.

It prints a markdown table and appends it to bench/RESULTS.md under a heading with the card's name
(``torch.cuda.get_device_name``) and the date (``--results PATH`` to write elsewhere, ``--results -`` to
only print). ``--small`` prints only unless ``--results`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daunce_store.scoring import available_backends, prepare_queries  # noqa: E402
from daunce_store.scoring._backend import make_accumulator  # noqa: E402
from daunce_store.scoring._torch import TorchScorer, _matmul_precision, _TILE_VALUES  # noqa: E402

BLOCK = 65536
RESULTS = ROOT / "bench" / "RESULTS.md"


def _sync(torch, dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best(fn: Callable[[], object], sync: Callable[[], None], repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs after one warm-up (which also returns the result)."""
    out = fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def _host_data(torch, dev, n: int, kc: int) -> np.ndarray:
    """(n, K) float32 random rows in pageable host memory (generated on the device when it is a GPU)."""
    x = np.empty((n, kc), np.float32)
    g = torch.Generator(device=dev).manual_seed(kc)
    step = 1 << 20
    for r0 in range(0, n, step):
        r = min(step, n - r0)
        x[r0 : r0 + r] = torch.randn((r, kc), generator=g, device=dev).cpu().numpy()
    return x


def _blocks(x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for r0 in range(0, len(x), BLOCK):
        yield r0, x[r0 : r0 + BLOCK]


def bandwidths(torch, dev, nbytes: int) -> dict[str, float]:
    """GB/s: pageable and pinned host→device, and device copy (read + write)."""
    n = nbytes // 4
    host = torch.ones(n)
    pinned = host.pin_memory() if dev.type == "cuda" else host
    sync = lambda: _sync(torch, dev)  # noqa: E731
    out = {}
    out["h2d pageable"] = nbytes / _best(lambda: host.to(dev), sync, 3)[0] / 1e9
    out["h2d pinned"] = nbytes / _best(lambda: pinned.to(dev, non_blocking=True), sync, 3)[0] / 1e9
    a = host.to(dev)
    b = torch.empty_like(a)
    out["device copy"] = 2 * nbytes / _best(lambda: b.copy_(a), sync, 3)[0] / 1e9
    return out


def _stream(x: np.ndarray, q: np.ndarray, k: int, backend: str, **options) -> dict:
    acc = make_accumulator(q, k, "cov", backend=backend, **options)
    for r0, b in _blocks(x):
        acc.push_block(r0, b)
    return acc.finish()


def _gemm_only(torch, scorer: TorchScorer, q: np.ndarray) -> None:
    """The resident matmuls of the same tiles as ``TorchScorer.topk``, with nothing else."""
    qp = torch.from_numpy(prepare_queries(q, "cov")).to(scorer.device)
    tile = max(256, _TILE_VALUES["cuda" if scorer.device.type == "cuda" else "cpu"] // len(q))
    with torch.no_grad(), _matmul_precision(torch, False):
        for r0 in range(0, scorer.n_rows, tile):
            qp @ scorer.rows[r0 : r0 + tile].T


def _faiss_gpu(torch, x: np.ndarray, qs: dict[int, np.ndarray], k: int, small: bool, repeat: int) -> dict[int, float] | str:
    """Search time per m of faiss brute force on centered rows (GPU index; CPU index only in --small runs)."""
    try:
        import faiss
    except ImportError:
        return "faiss does not import"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus and not small:
        return "faiss has no GPU here"
    xc = x - x.mean(axis=1, dtype=np.float64, keepdims=True).astype(np.float32)
    if gpus:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, x.shape[1])
    else:
        index = faiss.IndexFlatIP(x.shape[1])
    index.add(xc)
    del xc
    out = {}
    for m, q in qs.items():
        qp = prepare_queries(q, "cov")
        out[m] = _best(lambda: (index.search(qp, k), index.search(-qp, k)), lambda: None, repeat)[0]
    del index
    return out


def _agree(a: dict, b: dict) -> str:
    """Share of (query, rank) slots with the same row, and the largest score difference."""
    same = np.mean([np.mean(a[s][0] == b[s][0]) for s in a])
    diff = max(float(np.abs(a[s][1] - b[s][1]).max()) for s in a)
    return f"{100 * same:.2f}% same rows, max |Δscore| {diff:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="n = 200k, K = 16/64, m = 4/32, k = 20: a smoke run (CPU too)")
    ap.add_argument("--n", type=int, help="rows (default 10M, --small 200k)")
    ap.add_argument("--ks", help="comma-separated K (default 64,256; --small 16,64)")
    ap.add_argument("--ms", help="comma-separated m (default 100,1000; --small 4,32)")
    ap.add_argument("--k", type=int, help="top-k (default 100; --small 20)")
    ap.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per case after a warm-up (best is kept)")
    ap.add_argument("--no-rust", action="store_true", help="skip the Rust CPU baseline")
    ap.add_argument("--results", help="markdown file to append to (default bench/RESULTS.md; '-' = print only; "
                                      "--small: print only unless given)")
    args = ap.parse_args()

    import torch

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.n or (200_000 if args.small else 10_000_000)
    ks = [int(v) for v in (args.ks or ("16,64" if args.small else "64,256")).split(",")]
    ms = [int(v) for v in (args.ms or ("4,32" if args.small else "100,1000")).split(",")]
    k = args.k or (20 if args.small else 100)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    sync = lambda: _sync(torch, dev)  # noqa: E731
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    bw = bandwidths(torch, dev, (64 if args.small else 1024) << 20) if dev.type == "cuda" else {}
    log(f"bandwidths {bw}")
    pcie, hbm = bw.get("h2d pinned", float("nan")), bw.get("device copy", float("nan"))
    rows, notes = [], []
    rust_case = (ks[0], ms[0])
    for kc in ks:
        x = _host_data(torch, dev, n, kc)
        qs = {m: np.random.default_rng(m).standard_normal((m, kc), dtype=np.float32) for m in ms}
        data_gb = x.nbytes / 1e9
        streamed, resident = {}, {}
        for m in ms:
            t, streamed[m] = _best(lambda: _stream(x, qs[m], k, "torch", device=dev), sync, args.repeat)
            rows.append([f"torch streamed ({dev.type})", n, kc, m, t, data_gb / pcie if dev.type == "cuda" else None, None, None])
            log(f"streamed K={kc} m={m}: {t:.3f} s")
        sync()
        t0 = time.perf_counter()
        scorer = TorchScorer.from_blocks(_blocks(x), "cov", n_rows=n, device=dev)
        sync()
        t_build = time.perf_counter() - t0
        log(f"resident build K={kc}: {t_build:.3f} s")
        for m in ms:
            t, resident[m] = _best(lambda: scorer.topk(qs[m], k), sync, args.repeat)
            t_gemm = _best(lambda: _gemm_only(torch, scorer, qs[m]), sync, args.repeat)[0]
            rows.append([f"torch resident ({dev.type})", n, kc, m, t, None, data_gb / hbm if bw else None, t_gemm])
            notes.append(f"K={kc}, m={m}: resident vs streamed {_agree(resident[m], streamed[m])}; build {t_build:.2f} s")
            log(f"resident K={kc} m={m}: {t:.3f} s (gemm {t_gemm:.3f} s)")
        del scorer
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_rust and (kc, ms[0]) == rust_case and "rust" in available_backends():
            m = ms[0]
            t, out = _best(lambda: _stream(x, qs[m], k, "rust"), lambda: None, 1)
            rows.append([f"rust CPU ({os.cpu_count()} cores)", n, kc, m, t, None, None, None])
            notes.append(f"K={kc}, m={m}: torch streamed vs rust {_agree(streamed[m], out)}")
            log(f"rust K={kc} m={m}: {t:.3f} s")
        faiss_times = _faiss_gpu(torch, x, qs, k, args.small, args.repeat)
        if isinstance(faiss_times, str):
            notes.append(f"K={kc}: faiss skipped ({faiss_times})")
        else:
            for m, t in faiss_times.items():
                rows.append(["faiss brute force" + (" (GPU)" if dev.type == "cuda" else " (CPU)"), n, kc, m, t, None, None, None])
            log(f"faiss K={kc}: {faiss_times}")
        del x
        gc.collect()

    fmt = lambda v: "—" if v is None else f"{v:.3f} s"  # noqa: E731
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## GPU scoring: {card} ({date})",
        "",
        f"`python bench/gpu.py{' --small' if args.small else ''}`; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if dev.type == "cuda" else "")
        + f"; cov, k = {k}, both sides, fp32 (no TF32), data in host RAM in blocks of {BLOCK} rows; best of "
        f"{args.repeat} after a warm-up. "
        + (f"Bandwidths: host→device pageable {bw['h2d pageable']:.1f} GB/s, pinned {pcie:.1f} GB/s; device copy "
           f"{hbm:.0f} GB/s (read + write). " if bw else "No GPU: no bandwidths or floors. ")
        + "PCIe floor = n·K·4 B / pinned bandwidth; HBM floor = n·K·4 B / device-copy bandwidth (the matrix "
        "read once); GEMM only = the resident matmuls alone; build = reading, sending and preparing the "
        "resident matrix once.",
        "",
        "| method | n | K | m | seconds | PCIe floor | HBM floor | GEMM only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, nn, kc, m, t, pf, hf, g in rows:
        lines.append(f"| {name} | {nn:,} | {kc} | {m} | {t:.3f} s | {fmt(pf)} | {fmt(hf)} | {fmt(g)} |")
    lines += ["", *[f"- {note}" for note in notes], f"- total wall time of the script: {time.perf_counter() - t_start:.0f} s", ""]
    table = "\n".join(lines)
    print(table)
    target = args.results if args.results is not None else ("-" if args.small else str(RESULTS))
    if target != "-":
        with open(target, "a") as f:
            f.write("\n" + table)
        log(f"appended to {target}")


if __name__ == "__main__":
    main()
