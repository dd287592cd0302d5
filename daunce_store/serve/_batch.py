"""Concurrent top-k requests answered together: one scan of the train rows for many queries.

A scan's cost is nearly independent of how many queries it scores (1M × 64 in memory: 0.30 s for one
query, 0.39 s for 40; bench/RESULTS.md, "Serving"), so scanning once per request wastes the machine under
load. Requests for named queries queue here; one worker thread takes everything queued, groups it by
(query set, k, measure, side), scores each group's queries in one ``store.topk`` call on the snapshot
taken when the batch starts (so a column committed before a request arrived counts for it), and hands each
request its own queries' records, in its order. Scans run one at a time: the kernel already uses every core.

A query scored in a batch of several gets the same top-k as alone, its scores equal to float32 rounding
(the GEMM of a lone query takes another path), as with any two ``--query`` lists of `daunce topk`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from daunce_store.scoring import envelope, side_choice
from daunce_store.serve._rows import ServedStore

__all__ = ["MAX_BATCH_QUERIES", "TopkBatcher"]

MAX_BATCH_QUERIES = 256  # queries per scan; at 200 the selection starts to cost (1.16 s against 0.39 s at 40)


@dataclasses.dataclass(frozen=True)
class _Request:
    key: tuple[str, int, str, str]  # query set, k, measure, side
    queries: tuple[str, ...]
    future: Future


class TopkBatcher:
    """Answers ``topk(query_set, queries, ...)`` like ``store.topk`` (records, measure, K), batching
    concurrent calls; ``queries`` must be checked ids of the set (an unknown one would fail its batch)."""

    def __init__(self, store: ServedStore):
        self._store = store
        self.scans = 0  # store.topk calls made: fewer than the requests under load
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="daunce-topk-batcher", daemon=True)
        self._worker.start()

    def topk(self, query_set: str, queries: Sequence[str], *, k: int, measure: str, side: str) -> dict[str, Any]:
        return self.submit(query_set, queries, k=k, measure=measure, side=side).result()

    def submit(self, query_set: str, queries: Sequence[str], *, k: int, measure: str, side: str) -> Future:
        """Queue the request; its answer (or error) arrives in the returned future (an async route awaits it
        without holding a thread)."""
        request = _Request((query_set, k, measure, side), tuple(queries), Future())
        self._queue.put(request)
        return request.future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # everything queued meanwhile joins this batch
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple[str, int, str, str], list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.key, []).append(request)
            for key, requests in groups.items():
                while requests:
                    take: list[_Request] = []
                    size = 0
                    while requests and (not take or size + len(requests[0].queries) <= MAX_BATCH_QUERIES):
                        size += len(requests[0].queries)
                        take.append(requests.pop(0))
                    self._answer(key, take)

    def _answer(self, key: tuple[str, int, str, str], requests: list[_Request]) -> None:
        query_set, k, measure, side = key
        try:
            names = list(dict.fromkeys(q for r in requests for q in r.queries))  # each query scored once
            self.scans += 1
            result = self._store.topk(query_set, names, k=k, measure=measure, side=side_choice(side),
                                      snapshot=self._store.current())
            by_query: dict[str, list[dict[str, Any]]] = {}
            for record in result.records():
                by_query.setdefault(record["query"], []).append(record)
            for r in requests:
                r.future.set_result(envelope(result.measure, result.num_columns, [rec for q in r.queries for rec in by_query[q]]))
        except BaseException as error:  # every request of the batch gets the error (same key: same cause)
            for r in requests:
                if not r.future.done():
                    r.future.set_exception(error)
