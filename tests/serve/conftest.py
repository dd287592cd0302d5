"""Fixtures of the server tests (helpers: ``_serve_support.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_support import K, M, N, Server, losses, make_store, write_data  # noqa: E402


@pytest.fixture
def served(tmp_path: Path) -> dict[str, Any]:
    """A store (n=120, m=5, K=10), its data file, and one more column's losses kept back."""
    train, query = losses(N, M, K + 1)
    url = make_store(tmp_path / "s.zarr", train[:, :K], query[:, :K])
    return {"url": url, "data": write_data(tmp_path / "train.jsonl"), "next_column": (train[:, K], query[:, K])}


@pytest.fixture
def server(served: dict[str, Any]) -> Iterator[Server]:
    """A real uvicorn server on a free 127.0.0.1 port over ``served``."""
    from daunce_store.serve import ServedStore, create_app, load_data

    store = ServedStore.open_served(served["url"])
    with Server(create_app(store, load_data(store, [str(served["data"])]))) as s:
        yield s
