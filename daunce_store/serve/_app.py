"""``daunce serve``: a FastAPI app over one store — a JSON API for pipelines and a page to browse with.

The API answers with the records the CLI's ``--format json`` writes (``Attribution.records``,
``Stability.summary_records`` / ``records``, ``LossStore.status``), computed by the façade's own methods on
a :class:`ServedStore` (train rows in memory, snapshot taken per request: columns committed while the
server runs count from the next request on). Bad input is a 4xx with ``{"error": "<one line>"}``.

The page is static HTML + a small script calling the API (no build step, nothing from the network); it
writes every text with ``textContent``, so a training text holding markup shows as text.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and string annotations of the aliases local to create_app (QuerySet, K, ...) would not resolve.

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from daunce_store._optional import import_optional
from daunce_store.errors import (
    CorruptChunkError,
    CorruptRecordError,
    DaunceStoreError,
    InvalidInputError,
    UnknownIdError,
    UnknownQuerySetError,
)
from daunce_store.scoring import DEFAULT_MEASURE, MEASURE_HELP, MEASURE_NAMES, TOPK_MEASURE
from daunce_store.serve._batch import TopkBatcher
from daunce_store.serve._data import ExampleData
from daunce_store.serve._rows import ServedStore
from daunce_store.store import json_ready

__all__ = ["create_app"]

STATIC = Path(__file__).parent / "static"
TRAIN = "train"  # the data set name of the train rows (not a query-set name: the store refuses it)
MAX_LISTED_QUERIES = 1000  # ids per /api/queries answer; narrow with contains=


def _status_code(error: DaunceStoreError) -> int:
    if isinstance(error, (UnknownQuerySetError, UnknownIdError)):
        return 404
    if isinstance(error, (CorruptChunkError, CorruptRecordError)):
        return 500  # the store is damaged, not the request
    return 400


def _finite(value: Any) -> Any:
    """NaN and inf as null (JSON has neither), through dicts and lists: for status figures, where a missing
    value is no answer's point. Scores go through :func:`json_ready` instead, which never hides one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def create_app(store: ServedStore, data: Mapping[str, ExampleData] | None = None, *, batch: bool = True) -> Any:
    """The FastAPI app serving ``store``; ``data`` maps ``train`` and query-set names to their examples;
    ``batch``: score concurrent top-k requests for named queries in one scan (False: one scan per request,
    each answer bit for bit a lone ``store.topk``)."""
    import_optional("fastapi", "serve", "`daunce serve`")
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    data = dict(data or {})
    batcher = TopkBatcher(store) if batch else None
    app = FastAPI(title="daunce serve", summary=f"Daunce attribution over {store.url}")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(DaunceStoreError)
    def store_error(request: Request, error: DaunceStoreError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=_status_code(error))

    @app.exception_handler(RequestValidationError)
    def bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    QuerySet = Annotated[str, Query(description="Query set name.")]
    Queries = Annotated[list[str], Query(description="Query id; repeatable (default: the whole set).")]
    K = Annotated[int, Query(description="Train examples per query and side.")]
    MeasureQ = Annotated[str, Query(description=f"Score measure. {MEASURE_HELP}.")]
    SideQ = Annotated[str, Query(description="pos (proponents), neg (opponents) or both.")]

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/self-influence", include_in_schema=False)
    def self_influence_page() -> FileResponse:
        return FileResponse(STATIC / "self.html")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        """`daunce status --format json`: sizes, committed columns, leases, bytes, version."""
        store.current()
        return _finite(store.status())

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """What the page needs, cheaply (polled): committed columns, query sets, measures, data files."""
        snap = store.current()
        return {
            "url": store.url, "n_train": store.n_train, "columns": len(snap),
            "query_sets": {name: {"m": m, "columns": len(snap.query_slots.get(name, ()))} for name, m in store.query_sets().items()},
            "measures": list(MEASURE_NAMES), "default_measure": DEFAULT_MEASURE, "topk_measure": TOPK_MEASURE,
            "data": {name: d.info() for name, d in data.items()}, "rows": store.rows_info,
        }

    @app.get("/api/queries")
    def queries(query_set: QuerySet, contains: str = "", limit: int = MAX_LISTED_QUERIES) -> dict[str, Any]:
        """Ids of a query set (those containing ``contains``), the first ``limit`` of them."""
        if not 1 <= limit <= MAX_LISTED_QUERIES:
            raise InvalidInputError(f"limit must be in 1..{MAX_LISTED_QUERIES}, not {limit}")
        ids = [str(q) for q in store.query_ids(query_set).tolist() if contains in str(q)]
        return {"query_set": query_set, "total": len(ids), "ids": ids[:limit]}

    @app.get("/api/topk")
    def topk(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = TOPK_MEASURE,
             side: SideQ = "both") -> dict[str, Any]:
        """`daunce topk --format json`: top-k proponents and opponents per query. Concurrent requests naming
        queries are scored together in one scan (see ``TopkBatcher``)."""
        if not query or batcher is None:
            return store.topk(query_set, query or None, k=k, measure=measure, side=side, snapshot=store.current()).envelope()  # type: ignore[arg-type]
        store.query_index(query_set, query)  # an unknown set or id fails this request alone, not its batch
        return batcher.topk(query_set, query, k=k, measure=measure, side=side)

    @app.get("/api/influence")
    def influence(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = DEFAULT_MEASURE,
                  side: SideQ = "both") -> dict[str, Any]:
        """`daunce influence --format json`: top-k by the mean score over the query set (or the given queries)."""
        snap = store.current()
        return store.influence(query_set, query or None, k=k, measure=measure, side=side, snapshot=snap).envelope()  # type: ignore[arg-type]

    @app.get("/api/self-influence")
    def self_influence(k: K = 10, measure: MeasureQ = DEFAULT_MEASURE, side: SideQ = "pos") -> dict[str, Any]:
        """`daunce self-influence --format json`: highest (pos) or lowest (neg) self-scores."""
        snap = store.current()
        return store.self_influence(k=k, measure=measure, side=side, snapshot=snap).envelope()  # type: ignore[arg-type]

    @app.get("/api/stability")
    def stability(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = DEFAULT_MEASURE,
                  side: SideQ = "both", fraction: Annotated[list[float], Query()] = [0.25, 0.5, 1.0],
                  bootstrap: int = 20, seed: int = 0) -> dict[str, Any]:
        """`daunce stability --format json`: top-k overlap over nested column subsets and bootstrap SEs."""
        snap = store.current()
        result = store.stability(query_set, query or None, k=k, measure=measure, side=side, fractions=tuple(fraction),  # type: ignore[arg-type]
                                 bootstrap=bootstrap, seed=seed, snapshot=snap)
        # NaN there means "not computed" (no bootstrap resamples): null, as `daunce stability --format json` writes it
        return json_ready({"measure": result.measure, "num_columns": result.num_columns, "summary": result.summary_records(),
                           "records": result.records(), "asymmetry": result.asymmetry}, nan_as_null=True, what="the stability answer")

    def data_of(name: str) -> ExampleData:
        if name not in data:
            given = ", ".join(data) or "none: start the server with --data"
            raise UnknownQuerySetError(f"no data file for {name!r} (data files: {given})")
        return data[name]

    @app.get("/api/examples")
    def examples(id: Annotated[list[str], Query(description="Example id; repeatable.")],
                 set: str = TRAIN) -> dict[str, Any]:
        """The content of examples from the data files: ``set`` is ``train`` or a query-set name."""
        d = data_of(set)
        return {"set": set, "label_column": d.label_column, "examples": _finite(d.content(id))}

    @app.get("/api/image")
    def image(id: str, column: str, set: str = TRAIN) -> FileResponse:
        """The image file an ``image-file`` column names for one example."""
        path = data_of(set).image_file(id, column)
        if not path.is_file():
            raise UnknownIdError(f"the image of {id!r} in column {column!r} is no longer on disk")
        return FileResponse(path)

    return app
