"""Helpers of the server tests: a small real store with a data file, and a real uvicorn server on a free
loopback port in a background thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import daunce_store

N, M, K = 120, 5, 10
# A real 1 × 1 PNG (a red pixel).
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082")
XSS = '<script>window.__xss = 1</script><img src="nope.png" onerror="window.__xss = 2">'


def losses(n: int, m: int, k: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) train and (m, k) query losses sharing a low-rank structure, so rankings are not ties."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((4, k))
    train = rng.standard_normal((n, 4)) @ latent + 0.5 * rng.standard_normal((n, k))
    query = rng.standard_normal((m, 4)) @ latent + 0.5 * rng.standard_normal((m, k))
    return train.astype(np.float32), query.astype(np.float32)


def make_store(path: Path, train: np.ndarray, query: np.ndarray) -> str:
    store = daunce_store.init(path, [f"t{i}" for i in range(len(train))], {"test": [f"q{j}" for j in range(len(query))]},
                              chunk_rows=32)
    for c in range(train.shape[1]):
        store.append(f"p{c}", train[:, c], {"test": query[:, c]}, metadata={"seed": c})
    return str(path)


def write_data(path: Path, n: int = N) -> Path:
    """A jsonl file for the train rows t0..t{n-1}: a text (t3's is a markup payload), a label and 4 × 4 pixels."""
    with path.open("w") as f:
        for i in range(n):
            text = XSS if i == 3 else f"example number {i}"
            f.write(json.dumps({"id": f"t{i}", "text": text, "label": i % 3, "pixels": [float((i + j) % 16) for j in range(16)]}) + "\n")
    return path


def append_next(served: dict[str, Any]) -> None:
    """Commit the kept-back column through another handle, as a perturbation worker would."""
    train, query = served["next_column"]
    daunce_store.open(served["url"]).append(f"p{K}", train, {"test": query}, metadata={"seed": K})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; ``url`` is its base address."""

    def __init__(self, app: Any):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
