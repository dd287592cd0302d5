"""Serving attribution over HTTP (``daunce serve``, the ``serve`` extra): a JSON API and a page.

>>> from daunce_store.serve import serve
>>> serve("attrib.zarr", data=["train.jsonl", "test=test.jsonl"], port=8000)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daunce_store._optional import import_optional
from daunce_store.errors import InvalidInputError
from daunce_store.serve._app import TRAIN, create_app
from daunce_store.serve._data import DATA_SUFFIXES, ExampleData, read_examples
from daunce_store.serve._rows import DEFAULT_CACHE_BYTES, ServedStore
from daunce_store.store import data_file_specs

__all__ = ["DATA_SUFFIXES", "DEFAULT_CACHE_BYTES", "ExampleData", "ServedStore", "create_app", "load_data", "remembered_data", "serve"]


def load_data(store: ServedStore, specs: Sequence[str]) -> dict[str, ExampleData]:
    """The data files of ``specs``: ``FILE`` (the train examples) or ``NAME=FILE`` (query set NAME), each
    read and matched to the store's ids now, so a wrong file fails before the server starts."""
    out: dict[str, ExampleData] = {}
    for name, path in data_file_specs(specs, TRAIN).items():
        ids = store.train_ids if name == TRAIN else store.query_ids(name)
        out[name] = read_examples(path, ids, "train ids" if name == TRAIN else f"query set {name!r}")
    return out


def remembered_data(store: ServedStore, log: Callable[[str], None] = print) -> list[str]:
    """The ``--data`` specs of the files a recipe store was made from (:meth:`Store.data_files`), those that
    still exist; each one that has moved is logged."""
    specs = []
    for name, path in store.data_files().items():
        if not Path(path).exists():
            log(f"the {'train data' if name == TRAIN else f'data of query set {name!r}'} this store was made from, {path}, "
                f"no longer exists; give its new place with --data {'' if name == TRAIN else name + '='}FILE")
        else:
            specs.append(path if name == TRAIN else f"{name}={path}")
    return specs


def serve(url: str, *, data: Sequence[str] = (), host: str = "127.0.0.1", port: int = 8000,
          cache_bytes: int = DEFAULT_CACHE_BYTES, storage_options: dict[str, Any] | None = None, batch: bool = True,
          log: Callable[[str], None] = print) -> None:
    """Open the store, read the data files, and serve until interrupted (uvicorn, one process)."""
    import_optional("uvicorn", "serve", "`daunce serve`")
    import_optional("fastapi", "serve", "`daunce serve`")
    import uvicorn

    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port must be in 0..65535, not {port}")
    store = ServedStore.open_served(url, storage_options=storage_options, cache_bytes=cache_bytes)
    examples = load_data(store, data or remembered_data(store, log))  # a recipe store remembers its files
    rows = store.rows_info
    held = f"train rows in memory ({rows['bytes'] / 2**20:.0f} MiB, read in {rows['load_seconds']:.1f} s)" if rows["cached"] \
        else "train rows read from the store per request (larger than the cache)"
    log(f"{store.url}: n={store.n_train}, K={rows['columns']}, {held}; data for {', '.join(examples) or 'no set'}")
    log(f"serving on http://{host}:{port}/  (API: /api/topk, /api/influence, /api/self-influence, /api/stability, /api/status; docs: /docs)")
    uvicorn.run(create_app(store, examples, batch=batch), host=host, port=port, log_level="warning")
