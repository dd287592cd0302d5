"""``daunce serve``: a FastAPI app over one store — a JSON API for pipelines and a page to browse with.

The API answers with the records the CLI's ``--format json`` writes (``Attribution.records``,
``Stability.summary_records`` / ``records``, ``LossStore.status``), computed by the façade's own methods on
a :class:`ServedStore` (train rows in memory, snapshot taken per request: columns committed while the
server runs count from the next request on). Bad input is a 4xx with ``{"error": "<one line>"}``.

The page is static HTML + a small script calling the API (no build step, nothing from the network); it
writes every text with ``textContent``, so a training text holding markup shows as text. Pages are sent with
a Content-Security-Policy allowing this origin only; ``/docs`` is Swagger UI from the ``swagger-ui-bundle-v2``
package, served here (no CDN).

Every route is behind :class:`~daunce_store.serve._guard.AccessGuard` (Host check, token off loopback);
routes whose work grows with their parameters check a :class:`~daunce_store.serve._work.WorkBudget` and run
in the :class:`~daunce_store.serve._work.ExpensiveLane` (see that module for how a new route opts in).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and string annotations of the aliases local to create_app (QuerySet, K, ...) would not resolve.

import asyncio
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, Field

from daunce_store._optional import import_optional
from daunce_store.errors import (
    CorruptChunkError,
    CorruptRecordError,
    DaunceStoreError,
    InvalidInputError,
    UnknownIdError,
    UnknownQuerySetError,
)
from daunce_store.scoring import DEFAULT_MEASURE, MEASURE_HELP, MEASURE_NAMES, TOPK_MEASURE, side_choice
from daunce_store.serve._batch import MAX_BATCH_QUERIES, TopkBatcher
from daunce_store.serve._data import ExampleData, RefusedFileError
from daunce_store.serve._guard import Access, AccessGuard
from daunce_store.serve._rows import ServedStore
from daunce_store.serve._work import DEFAULT_MAX_WORK, BusyError, ExpensiveLane, WorkBudget
from daunce_store.store import json_ready

__all__ = ["create_app"]

STATIC = Path(__file__).parent / "static"
TRAIN = "train"  # the data set name of the train rows (not a query-set name: the store refuses it)
MAX_LISTED_QUERIES = 1000  # ids per /api/queries answer; narrow with contains=
MAX_EXAMPLES = 10_000  # ids per /api/examples request
# New examples per /api/attribute request, and their characters: each is K forward passes on the server's CPU
# (SmolLM2-135M: ~0.1 s per example and column), and texts beyond the run's max_length are cut anyway.
MAX_NEW_EXAMPLES = 16
MAX_NEW_CHARACTERS = 32_000
# The pages: this origin only (the page draws pixels on canvases and data:image columns as <img>).
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
# Swagger UI's page starts it with an inline script.
DOCS_POLICY = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"


class NewExamples(BaseModel):
    """The body of ``POST /api/attribute``: one ``prompt`` and ``completion``, or ``rows`` with the run's fields."""

    prompt: Optional[str] = Field(None, description="The new example's prompt (with completion).")
    completion: Optional[str] = Field(None, description="The output to explain: its loss is what is attributed.")
    rows: Optional[list[dict[str, Any]]] = Field(None, description="Many new examples: the run's fields (prompt/completion "
                                                 "or messages; text/label) and an optional id.")
    k: int = Field(10, description="Train examples per new example and side.")
    measure: str = Field(TOPK_MEASURE, description=f"Score measure. {MEASURE_HELP}.")
    side: str = Field("both", description="pos (proponents), neg (opponents) or both.")

    def characters(self) -> int:
        """The characters of every text it holds (chats and other fields included)."""
        def count(value: Any) -> int:
            if isinstance(value, str):
                return len(value)
            if isinstance(value, dict):
                return sum(count(v) for v in value.values())
            return sum(count(v) for v in value) if isinstance(value, list) else 0
        return count([self.prompt, self.completion, self.rows])


def _status_code(error: DaunceStoreError) -> int:
    if isinstance(error, BusyError):
        return 503
    if isinstance(error, RefusedFileError):
        return 403
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


def create_app(store: ServedStore, data: Mapping[str, ExampleData] | None = None, *, batch: bool = True,
               access: Access | None = None, max_work: int = DEFAULT_MAX_WORK, expensive_slots: int = 1,
               expensive_queue: int = 16) -> Any:
    """The FastAPI app serving ``store``; ``data`` maps ``train`` and query-set names to their examples;
    ``batch``: score concurrent top-k requests for named queries in one scan (False: one scan per request,
    each answer bit for bit a lone ``store.topk``); ``access``: Host names and token (default: loopback, no
    token); ``max_work``: loss cells one request may score; ``expensive_slots`` / ``expensive_queue``: the
    expensive lane's size. ``app.state`` holds ``budget`` and ``lane`` for routes added later."""
    import_optional("fastapi", "serve", "`daunce serve`")
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    data = dict(data or {})
    batcher = TopkBatcher(store) if batch else None
    budget = WorkBudget(store.n_train, lambda: store.rows_info["columns"], max_work)
    lane = ExpensiveLane(expensive_slots, expensive_queue)
    app = FastAPI(title="daunce serve", summary=f"Daunce attribution over {store.url}", docs_url=None, redoc_url=None)
    app.state.budget, app.state.lane, app.state.access = budget, lane, access or Access()
    app.add_middleware(AccessGuard, access=app.state.access)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    docs_assets = _swagger_ui_assets()
    if docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

    @app.exception_handler(DaunceStoreError)
    def store_error(request: Request, error: DaunceStoreError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(error, BusyError) else None
        return JSONResponse({"error": str(error)}, status_code=_status_code(error), headers=headers)

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

    def n_queries(query_set: str, query: list[str]) -> int:
        """How many queries a request scores: those named, else the whole set (an unknown set: its 404)."""
        if query:
            return len(query)
        store.query_ids(query_set)
        return store.query_sets()[query_set]

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/attribute", include_in_schema=False)
    def attribute_page() -> FileResponse:
        return FileResponse(STATIC / "attribute.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/self-influence", include_in_schema=False)
    def self_influence_page() -> FileResponse:
        return FileResponse(STATIC / "self.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if docs_assets is None:  # no Swagger UI package: a page naming the schema and how to get the UI
            return HTMLResponse(_PLAIN_DOCS, headers={"Content-Security-Policy": PAGE_POLICY})
        from fastapi.openapi.docs import get_swagger_ui_html

        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="daunce serve · API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from validator.swagger.io
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page

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
            "data": {name: d.info() for name, d in data.items()}, "rows": store.rows_info, "limits": budget.limits(),
            "attribute": store.attribute_support(snap),
        }

    @app.get("/api/queries")
    def queries(query_set: QuerySet, contains: str = "", limit: int = MAX_LISTED_QUERIES) -> dict[str, Any]:
        """Ids of a query set (those containing ``contains``), the first ``limit`` of them."""
        if not 1 <= limit <= MAX_LISTED_QUERIES:
            raise InvalidInputError(f"limit must be in 1..{MAX_LISTED_QUERIES}, not {limit}")
        ids = [str(q) for q in store.query_ids(query_set).tolist() if contains in str(q)]
        return {"query_set": query_set, "total": len(ids), "ids": ids[:limit]}

    def plain_topk(query_set: str, query: list[str], k: int, measure: str, side: str) -> dict[str, Any]:
        return store.topk(query_set, query or None, k=k, measure=measure, side=side_choice(side), snapshot=store.current()).envelope()

    def checked_names(query_set: str, query: list[str], k: int) -> int:
        store.query_index(query_set, query)  # an unknown set or id fails this request alone, not its batch
        budget.check(k=k, queries=len(query))
        return len(query)

    @app.get("/api/topk")
    async def topk(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = TOPK_MEASURE,
                   side: SideQ = "both") -> dict[str, Any]:
        """`daunce topk --format json`: top-k proponents and opponents per query. Concurrent requests naming
        up to 256 queries are scored together in one scan (see ``TopkBatcher``), beside the expensive lane;
        a whole set or more queries take the lane."""
        if query and len(query) <= MAX_BATCH_QUERIES:
            await run_in_threadpool(checked_names, query_set, query, k)
            if batcher is None:  # --no-batch: one scan per request, in the server's threads
                return await run_in_threadpool(plain_topk, query_set, query, k, measure, side)
            return _finite(await asyncio.wrap_future(batcher.submit(query_set, query, k=k, measure=measure, side=side)))
        budget.check(k=k, queries=await run_in_threadpool(n_queries, query_set, query))
        return await lane.run(plain_topk, query_set, query, k, measure, side)

    @app.get("/api/influence")
    @lane.expensive
    def influence(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = DEFAULT_MEASURE,
                  side: SideQ = "both") -> dict[str, Any]:
        """`daunce influence --format json`: top-k by the mean score over the query set (or the given queries)."""
        budget.check(k=1, queries=n_queries(query_set, query))  # one ranking, k records per side
        budget.check(k=k, queries=1)
        snap = store.current()
        return store.influence(query_set, query or None, k=k, measure=measure, side=side_choice(side), snapshot=snap).envelope()

    @app.get("/api/self-influence")
    @lane.expensive
    def self_influence(k: K = 10, measure: MeasureQ = DEFAULT_MEASURE, side: SideQ = "pos") -> dict[str, Any]:
        """`daunce self-influence --format json`: highest (pos) or lowest (neg) self-scores."""
        budget.check(k=k, queries=1)
        snap = store.current()
        return store.self_influence(k=k, measure=measure, side=side_choice(side), snapshot=snap).envelope()

    @app.get("/api/stability")
    @lane.expensive
    def stability(query_set: QuerySet, query: Queries = [], k: K = 10, measure: MeasureQ = DEFAULT_MEASURE,
                  side: SideQ = "both", fraction: Annotated[list[float], Query()] = [0.25, 0.5, 1.0],
                  bootstrap: int = 20, seed: int = 0) -> dict[str, Any]:
        """`daunce stability --format json`: top-k overlap over nested column subsets and bootstrap SEs."""
        budget.check(k=k, queries=n_queries(query_set, query), passes=len(fraction) + bootstrap, bootstrap=bootstrap)
        snap = store.current()
        result = store.stability(query_set, query or None, k=k, measure=measure, side=side_choice(side), fractions=tuple(fraction),
                                 bootstrap=bootstrap, seed=seed, snapshot=snap)
        # NaN there means "not computed" (no bootstrap resamples): null, as `daunce stability --format json` writes it
        return json_ready({"measure": result.measure, "num_columns": result.num_columns, "summary": result.summary_records(),
                           "records": result.records(), "asymmetry": result.asymmetry, "negative_share": result.negative_share,
                           "drift_share": result.drift_share, "l2_center": result.l2_center}, nan_as_null=True, what="the stability answer")

    @app.post("/api/attribute")
    @lane.expensive
    def attribute(body: NewExamples) -> dict[str, Any]:
        """`daunce attribute --format json`: NEW examples (not in any query set) evaluated under the K adapters a
        recipe store kept (K forward passes each) and their top-k train examples; ids ``new-0``, ... unless the
        rows carry one. Text of the train ids: ``/api/examples``."""
        n_new = len(body.rows) if body.rows is not None else 1
        budget.cap("new examples", n_new, MAX_NEW_EXAMPLES, "send fewer rows per request")
        budget.cap("characters", body.characters(), MAX_NEW_CHARACTERS, "send shorter texts")
        budget.check(k=body.k, queries=n_new)
        support = store.attribute_support(store.current())
        if not support["available"]:
            raise InvalidInputError(f"this server cannot attribute new examples: {support['reason']}")
        return store.attribute(body.rows, prompt=body.prompt, completion=body.completion, k=body.k, measure=body.measure,
                               side=body.side).envelope()  # type: ignore[arg-type]

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
        budget.cap("ids", len(id), MAX_EXAMPLES, "ask for fewer ids at once")
        return {"set": set, "label_column": d.label_column, "examples": _finite(d.content(id))}

    @app.get("/api/image")
    def image(id: str, column: str, set: str = TRAIN) -> FileResponse:
        """The image file an ``image-file`` column names for one example."""
        path = data_of(set).image_file(id, column)  # refused (403, naming the rule) unless under a files root
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"})

    return app


def _swagger_ui_assets() -> Path | None:
    """The folder of Swagger UI's files from the ``swagger-ui-bundle-v2`` package (the ``serve`` extra), or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


_PLAIN_DOCS = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>daunce serve · API</title></head><body>
<h1>daunce serve · API</h1><p>The OpenAPI schema: <a href="/openapi.json">/openapi.json</a>. For the interactive page
install the <code>serve</code> extra (<code>pip install 'daunce-store[serve]'</code>: Swagger UI, served from here).</p>
<p>Routes: /api/topk, /api/attribute (POST), /api/influence, /api/self-influence, /api/stability, /api/status, /api/info, /api/queries,
/api/examples, /api/image.</p></body></html>"""
