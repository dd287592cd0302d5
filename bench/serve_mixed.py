"""Mixed load on `daunce serve`: do expensive requests starve top-k? (not a test)

    python bench/serve_mixed.py                          # 200k x 64 store, 200 clients
    python bench/serve_mixed.py --old-src /tmp/serve_old # also the server before the expensive lane

Builds (or reuses) ``bench/topk.py``'s compacted store of random columns, then for each server runs two
bursts of ``--clients`` requests sent at once (httpx AsyncClient, one connection each): **alone**, every
request a top-k for one random named query (k = 10); **mixed**, the same top-k requests for three quarters
of the clients and, for the other quarter, expensive requests (stability of one query at bootstrap 10,
influence over the whole query set of 1000, self-influence), interleaved. The figure is the p99 of top-k
in the mixed burst against the same server's top-k alone (a ratio within one run, one machine). Servers:

- ``lane`` — this code's default: expensive requests run one at a time in their own lane, 16 may wait,
  more are refused at once (503), beside the top-k batcher;
- ``no lane`` — this code with ``--expensive-slots 40 --expensive-queue 10000`` (as many at once as the
  server's shared thread pool had: the lane in name only);
- ``before`` (with ``--old-src``) — the code before the lane and the caps (a checkout of 928b9d9 with its
  built kernel), where expensive requests took threads of the shared pool.

Rows go to ``bench/_data/serve_mixed.jsonl``.
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

RESULTS = DATA / "serve_mixed.jsonl"
EXPENSIVE = (
    ("/api/stability", {"query_set": "bench", "query": "q5", "k": 10, "bootstrap": 10}),
    ("/api/influence", {"query_set": "bench", "k": 10}),
    ("/api/self-influence", {"k": 10}),
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(path: Path, extra: list[str], src: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": src} if src else dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "daunce_store.cli", "serve", str(path), "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=src or None)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/api/info", timeout=5).raise_for_status()
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(proc.communicate()[1]) from None
            time.sleep(0.2)


async def _burst(url: str, asks: list[tuple[str, str, dict]]) -> list[tuple[str, float, int]]:
    limits = httpx.Limits(max_connections=len(asks), max_keepalive_connections=len(asks))
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def one(kind: str, path: str, params: dict) -> tuple[str, float, int]:
            t = time.perf_counter()
            r = await client.get(path, params=params)
            return kind, time.perf_counter() - t, r.status_code

        return await asyncio.gather(*(one(*a) for a in asks))


def _asks(clients: int, mixed: bool, seed: int) -> list[tuple[str, str, dict]]:
    rng = np.random.default_rng(seed)
    asks = []
    for i in range(clients):
        if mixed and i % 4 == 3:
            path, params = EXPENSIVE[(i // 4) % len(EXPENSIVE)]
            asks.append(("expensive", path, params))
        else:
            asks.append(("topk", "/api/topk", {"query_set": "bench", "query": f"q{int(rng.integers(1000))}", "k": 10}))
    return asks


def _summary(done: list[tuple[str, float, int]], kind: str) -> dict:
    lat = [t for k, t, _ in done if k == kind]
    codes = [c for k, _, c in done if k == kind]
    if not lat:
        return {}
    p50, p99 = np.percentile(lat, [50, 99])
    return {f"{kind}_n": len(lat), f"{kind}_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
            f"{kind}_p50_ms": round(1e3 * p50, 1), f"{kind}_p99_ms": round(1e3 * p99, 1), f"{kind}_max_ms": round(1e3 * max(lat), 1)}


def _run(name: str, path: Path, extra: list[str], src: str | None, args: argparse.Namespace) -> None:
    proc, url = _start(path, extra, src)
    try:
        for q in ("q0", "q1", "q2"):  # warm-up: the first computes the whitened Gram
            httpx.get(url + "/api/topk", params={"query_set": "bench", "query": q, "k": 10}, timeout=600).raise_for_status()
        for burst, mixed in (("alone", False), ("mixed", True)):
            start = time.perf_counter()
            done = asyncio.run(_burst(url, _asks(args.clients, mixed, seed=7)))
            row = {"server": name, "burst": burst, "n": args.n, "K": args.kc, "clients": args.clients,
                   "wall_s": round(time.perf_counter() - start, 2), **_summary(done, "topk"), **_summary(done, "expensive"),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load1": round(os.getloadavg()[0], 2)}
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--kc", type=int, default=64)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--old-src", help="a checkout of the server before the lane (with its built kernel)")
    args = p.parse_args()
    DATA.mkdir(exist_ok=True)
    path = build_store(args.n, args.kc, packed=True)
    _run("lane", path, [], None, args)
    _run("no lane", path, ["--expensive-slots", "40", "--expensive-queue", "10000"], None, args)
    if args.old_src:
        _run("before", path, [], args.old_src, args)


if __name__ == "__main__":
    main()
