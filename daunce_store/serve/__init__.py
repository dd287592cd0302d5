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
from daunce_store.serve._guard import Access, is_loopback, new_token
from daunce_store.serve._rows import DEFAULT_CACHE_BYTES, ServedStore
from daunce_store.serve._work import DEFAULT_MAX_WORK, ExpensiveLane, WorkBudget
from daunce_store.store import data_file_specs

__all__ = ["DATA_SUFFIXES", "DEFAULT_CACHE_BYTES", "DEFAULT_MAX_WORK", "Access", "ExampleData", "ExpensiveLane", "ServedStore",
           "WorkBudget", "create_app", "load_data", "remembered_data", "serve"]


def load_data(store: ServedStore, specs: Sequence[str], files_roots: Sequence[str] = ()) -> dict[str, ExampleData]:
    """The data files of ``specs``: ``FILE`` (the train examples) or ``NAME=FILE`` (query set NAME), each
    read and matched to the store's ids now, so a wrong file fails before the server starts. Image files
    they name are served from each file's folder and ``files_roots``."""
    out: dict[str, ExampleData] = {}
    for name, path in data_file_specs(specs, TRAIN).items():
        ids = store.train_ids if name == TRAIN else store.query_ids(name)
        out[name] = read_examples(path, ids, "train ids" if name == TRAIN else f"query set {name!r}", files_roots)
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
          allowed_hosts: Sequence[str] = (), token: str | None = None, no_token: bool = False,
          files_roots: Sequence[str] = (), max_work: int = DEFAULT_MAX_WORK, expensive_slots: int = 1,
          expensive_queue: int = 16, log: Callable[[str], None] = print) -> None:
    """Open the store, read the data files, and serve until interrupted (uvicorn, one process). Off loopback
    a token is made (unless ``token`` or ``no_token``) and the URL carrying it is logged once."""
    import_optional("uvicorn", "serve", "`daunce serve`")
    import_optional("fastapi", "serve", "`daunce serve`")
    import uvicorn

    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port must be in 0..65535, not {port}")
    if token is None and not no_token and not is_loopback(host):
        token = new_token()
    access = Access(host, tuple(allowed_hosts), token, no_token)  # checked before the store is read
    store = ServedStore.open_served(url, storage_options=storage_options, cache_bytes=cache_bytes)
    examples = load_data(store, data or remembered_data(store, log), files_roots)  # a recipe store remembers its files
    app = create_app(store, examples, batch=batch, access=access, max_work=max_work, expensive_slots=expensive_slots,
                     expensive_queue=expensive_queue)
    rows = store.rows_info
    held = f"train rows in memory ({rows['bytes'] / 2**20:.0f} MiB, read in {rows['load_seconds']:.1f} s)" if rows["cached"] \
        else "train rows read from the store per request (larger than the cache)"
    log(f"{store.url}: n={store.n_train}, K={rows['columns']}, {held}; data for {', '.join(examples) or 'no set'}")
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    log(f"serving on http://{shown}:{port}/  (API: /api/topk, /api/attribute, /api/influence, /api/self-influence, /api/stability, /api/status; docs: /docs)")
    if token is not None:
        log(f"open it with its token (once; the page keeps it in a cookie): http://{shown}:{port}/?token={token}")
    if no_token and not is_loopback(host):
        log(f"warning: --no-token on {host}: anyone who can reach port {port} can read the store and the data files")
    if not is_loopback(host):
        log(f"Host names answered: {', '.join(access.hosts)}; add the name clients use with --allowed-host NAME")
    uvicorn.run(app, host=host, port=port, log_level="warning")
