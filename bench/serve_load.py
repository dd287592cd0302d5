"""Load test of `daunce serve` on loopback (not a test).

    python bench/serve_load.py                       # 1M x 64 store, 200 concurrent top-k requests
    python bench/serve_load.py --n 200000 --requests 50

Starts `daunce serve` as its own process on 127.0.0.1 over ``bench/topk.py``'s compacted store of random
float32 columns (built with the LossStore API if absent; no recorded draws, so ``auto`` is ``whitened``),
waits until it answers, warms it (the first request computes the whitened Gram), then times: ``--sequential``
requests one at a time, and ``--requests`` top-k requests sent at once (httpx AsyncClient, one connection
each), each for one random query of the 1000, k = 10, both sides. Every answer must be a 200 with 2k
records; one is checked against ``daunce_store.open(path).topk`` (the same train ids). Three servers, one
after the other: the default (rows in memory, concurrent requests batched into one scan), ``--no-batch``
(one scan per request) and ``--cache-gb 0`` (rows read from the store per request, as the CLI reads them;
batched). Rows go to ``bench/_data/serve_load.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topk import DATA, build_store  # noqa: E402  (the bench helpers)

import daunce_store  # noqa: E402

RESULTS = DATA / "serve_load.jsonl"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(path: Path, cache_gb: float, batch: bool) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "daunce_store.cli", "serve", str(path), "--port", str(port), "--cache-gb", str(cache_gb),
                             "--batch" if batch else "--no-batch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/api/info", timeout=5).raise_for_status()
            return proc, url, time.perf_counter() - t
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(proc.communicate()[1])
            time.sleep(0.2)


def _params(rng: np.random.Generator, k: int) -> dict:
    return {"query_set": "bench", "query": f"q{int(rng.integers(1000))}", "k": k}


async def _burst(url: str, n: int, k: int, seed: int) -> tuple[list[float], list[int], float]:
    rng = np.random.default_rng(seed)
    params = [_params(rng, k) for _ in range(n)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(p: dict) -> tuple[float, int]:
            t = time.perf_counter()
            r = await client.get("/api/topk", params=p)
            ok = r.status_code == 200 and len(r.json()["records"]) == 2 * k
            return time.perf_counter() - t, r.status_code if ok else -r.status_code

        start = time.perf_counter()
        done = await asyncio.gather(*(one(p) for p in params))
        wall = time.perf_counter() - start
    return [d[0] for d in done], [d[1] for d in done], wall


def _row(kind: str, lat: list[float], codes: list[int], wall: float, args: argparse.Namespace, extra: dict) -> dict:
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    row = {"kind": kind, "n": args.n, "K": args.kc, "k": args.k, "requests": len(lat), "ok": codes.count(200),
           "errors": len(codes) - codes.count(200), "p50_ms": round(1e3 * p50, 1), "p90_ms": round(1e3 * p90, 1),
           "p99_ms": round(1e3 * p99, 1), "max_ms": round(1e3 * max(lat), 1), "wall_s": round(wall, 2),
           "req_per_s": round(len(lat) / wall, 1), **extra,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load1": round(os.getloadavg()[0], 2)}
    print(json.dumps(row), flush=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _run(path: Path, cache_gb: float, batch: bool, args: argparse.Namespace, sequential: int, requests: int) -> None:
    proc, url, startup = _start(path, cache_gb, batch)
    label = ("rows in memory" if cache_gb > 0 else "rows read per request (--cache-gb 0)") + (", batched" if batch else ", --no-batch")
    try:
        info = httpx.get(url + "/api/info").json()
        assert info["rows"]["cached"] == (cache_gb > 0), info["rows"]
        t = time.perf_counter()
        for q in ("q0", "q1", "q2"):  # warm-up: the first computes the whitened Gram
            httpx.get(url + "/api/topk", params={"query_set": "bench", "query": q, "k": args.k}, timeout=600).raise_for_status()
        warm = time.perf_counter() - t
        body = httpx.get(url + "/api/topk", params={"query_set": "bench", "query": "q7", "k": args.k}, timeout=600).json()
        expected = daunce_store.open(path, mode="r").topk("bench", ["q7"], k=args.k).records()
        assert [r["train_id"] for r in body["records"]] == [r["train_id"] for r in expected]
        extra = {"server": label, "startup_s": round(startup, 2), "warmup_s": round(warm, 2)}
        if sequential:
            rng = np.random.default_rng(1)
            lat, codes = [], []
            start = time.perf_counter()
            for _ in range(sequential):
                t = time.perf_counter()
                r = httpx.get(url + "/api/topk", params=_params(rng, args.k), timeout=600)
                lat.append(time.perf_counter() - t)
                codes.append(r.status_code)
            _row("sequential", lat, codes, time.perf_counter() - start, args, extra)
        lat, codes, wall = asyncio.run(_burst(url, requests, args.k, seed=2))
        _row(f"{requests} concurrent", lat, codes, wall, args, extra)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--kc", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--sequential", type=int, default=20)
    args = p.parse_args()
    path = build_store(args.n, args.kc, packed=True)
    _run(path, 4.0, True, args, args.sequential, args.requests)
    _run(path, 4.0, False, args, args.sequential, args.requests)
    _run(path, 0.0, True, args, args.sequential, args.requests)


if __name__ == "__main__":
    main()
