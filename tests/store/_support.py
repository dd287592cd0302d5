"""Helpers shared by the store tests: store locations and deterministic loss columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import obstore
import obstore.store

import daunce_store

BUCKET = "daunce-test"  # the bucket that s3_endpoint (tests/conftest.py) creates


class Location:
    """Where a test's stores live: ``url(name)`` gives a fresh store URL, ``options`` the
    storage_options to pass with it (None for local paths)."""

    def __init__(self, kind: str, root: str, options: dict[str, Any] | None):
        self.kind = kind
        self.root = root
        self.options = options

    def url(self, name: str = "s.zarr") -> str:
        return f"{self.root}/{name}"

    def init(self, name: str = "s.zarr", *args: Any, **kwargs: Any) -> daunce_store.LossStore:
        return daunce_store.init(self.url(name), *args, storage_options=self.options, **kwargs)

    def open(self, name: str = "s.zarr", mode: str = "a") -> daunce_store.LossStore:
        return daunce_store.open(self.url(name), mode=mode, storage_options=self.options)  # type: ignore[arg-type]

    def objects(self, name: str = "s.zarr") -> dict[str, bytes]:
        """Every object stored under the store URL with its bytes: equal before and after a refused
        write means the store is unchanged bit for bit (data, metadata and commit log)."""
        url = self.url(name)
        if self.kind == "local":
            root = Path(url)
            if not root.exists():
                return {}
            if root.is_file():
                return {"": root.read_bytes()}
            return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        client = obstore.store.from_url(url, **(self.options or {}))
        keys = sorted(str(o["path"]) for o in obstore.list(client).collect())
        return {k: bytes(obstore.get(client, k).bytes()) for k in keys}

    def __repr__(self) -> str:
        return f"Location({self.kind})"



def column(pid: int, n: int, salt: int = 0) -> np.ndarray:
    """The deterministic float32 loss column of perturbation ``pid`` (so any process can check it)."""
    return np.random.default_rng([pid, n, salt]).standard_normal(n).astype(np.float32)


def fill(store: daunce_store.LossStore, pids: range | list[int], query_set: str | None = "test") -> None:
    """Append the deterministic columns of ``pids`` (train, and ``query_set`` when given)."""
    for pid in pids:
        queries = {}
        if query_set is not None:
            m = store.query_sets()[query_set]
            queries[query_set] = column(pid, m, salt=1)
        store.append(f"p{pid}", column(pid, store.n_train), queries, metadata={"seed": pid})


def assert_consistent(store: daunce_store.LossStore, query_set: str | None = "test") -> list[int]:
    """Every visible column is complete and bit-identical to :func:`column` of its perturbation, commit
    records agree with what readers see, and no slot or perturbation is committed twice. Returns the
    committed perturbation numbers (``p<k>`` -> k), sorted."""
    commits = store.commits()
    pids = [c.perturbation for c in commits]
    slots = [c.slot for c in commits]
    assert len(set(pids)) == len(pids), "a perturbation is committed twice"
    assert len(set(slots)) == len(slots), "two commits share a slot"
    snap = store.snapshot()
    assert snap.perturbations == tuple(pids) and store.num_columns() == len(pids)
    train = store.train_losses(snapshot=snap)
    assert train.shape == (store.n_train, len(pids))
    nums = [int(p.removeprefix("p")) for p in pids]
    for j, k in enumerate(nums):
        np.testing.assert_array_equal(train[:, j], column(k, store.n_train), err_msg=f"column p{k} differs")
    if query_set is not None:
        m = store.query_sets()[query_set]
        with_q = [c for c in commits if query_set in c.query_sets]
        q = store.query_losses(query_set, snapshot=snap)
        assert q.shape == (m, len(with_q))
        for j, c in enumerate(with_q):
            np.testing.assert_array_equal(q[:, j], column(int(c.perturbation[1:]), m, salt=1))
    return sorted(nums)
