"""Bounded work: caps on what one request may ask for, and a lane that keeps expensive requests off top-k.

**Caps** (:class:`WorkBudget`): a request's work is estimated in loss cells scored — a scoring pass over the
store reads n × K cells (at least ``PASS_FLOOR``: a pass has set-up costs however small the store is) and
grows with the queries scored at once; stability makes one pass per column fraction and per bootstrap
resample. A request over ``max_work`` (``--max-work``) is refused before it starts, naming the parameter
and its cap at this store's n and K. Answers are capped apart: k × queries records per side.

**The lane** (:class:`ExpensiveLane`): routes whose work grows with their parameters (stability, influence,
self-influence, top-k of a whole set) run in the lane's own threads, ``slots`` at a time, at most
``waiting`` more queued; beyond that a request is refused at once (503, retry). They never hold a thread
of the server's shared pool, so cheap requests (named-query top-k, info, examples) keep being answered
while expensive ones run or queue. A new expensive route opts in by decorating its endpoint::

    @app.get("/api/new")
    @lane.expensive
    def new_route(...):                          # runs in the lane; a sync def, as usual
        budget.check(k=k, queries=1, passes=..)  # refused naming the cap when over budget (scoring work)
        budget.cap("tokens", n, MAX_TOKENS, "send a shorter text")  # a route's own cap
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from daunce_store.errors import DaunceStoreError, InvalidInputError

__all__ = ["DEFAULT_MAX_WORK", "BusyError", "ExpensiveLane", "OverBudgetError", "WorkBudget"]

# Loss cells one request may score: 2^30 is ~16 passes over 1M × 64 rows (a few seconds on one machine).
DEFAULT_MAX_WORK = 1 << 30
# What a pass costs at the least, in cells: per-pass set-up (measure preparation, accumulators, selection)
# dominates small stores (n = 500, K = 10: ~1 ms a resample, as much as ~2.5e5 cells scanned).
PASS_FLOOR = 1 << 18
QUERIES_PER_PASS = 64  # queries scored together add a pass's worth of work per 64 (GEMM next to the scan)
MAX_RECORDS = 100_000  # k × queries per side in one answer


class OverBudgetError(InvalidInputError):
    """A request asks for more work than this server allows (a 400 naming the cap)."""


class BusyError(DaunceStoreError):
    """The expensive lane is full (a 503: retry later)."""


class WorkBudget:
    """Caps relative to the store: ``n_train`` and the committed columns ``columns()`` now."""

    def __init__(self, n_train: int, columns: Callable[[], int], max_work: int = DEFAULT_MAX_WORK):
        if isinstance(max_work, bool) or not isinstance(max_work, int) or max_work < PASS_FLOOR:
            raise InvalidInputError(f"--max-work must be a whole number >= {PASS_FLOOR} (loss cells per request), not {max_work!r}")
        self.n_train = n_train
        self.columns = columns
        self.max_work = max_work

    def pass_cost(self, queries: int) -> float:
        return max(self.n_train * max(self.columns(), 1), PASS_FLOOR) * (1 + queries / QUERIES_PER_PASS)

    def max_queries(self) -> int:
        """Queries one scoring pass may take."""
        base = max(self.n_train * max(self.columns(), 1), PASS_FLOOR)
        return max(int((self.max_work / base - 1) * QUERIES_PER_PASS), 0)

    def max_passes(self, queries: int) -> int:
        return int(self.max_work // self.pass_cost(queries))

    def limits(self) -> dict[str, int]:
        """The caps now, for one query (what the page asks for): it stays within them."""
        return {"max_work": self.max_work, "max_records": MAX_RECORDS, "max_queries": self.max_queries(),
                "max_bootstrap_one_query": max(self.max_passes(1) - 3, 0)}

    @staticmethod
    def cap(name: str, value: int, cap: int, advice: str) -> None:
        """A route's own cap (ids per request, tokens of a text, ...): refused naming it when ``value`` exceeds it."""
        if value > cap:
            raise OverBudgetError(f"{value} {name} in one request is over this server's cap of {cap}: {advice}")

    def check(self, *, k: int, queries: int, passes: int = 1, bootstrap: int | None = None) -> None:
        """Refuse (:class:`OverBudgetError`, naming the cap) a request scoring ``queries`` queries in
        ``passes`` passes (stability: fractions + ``bootstrap``) and answering k per query and side."""
        where = f"at n={self.n_train}, K={self.columns()}; --max-work {self.max_work}"
        if isinstance(k, int) and k * queries > MAX_RECORDS:
            raise OverBudgetError(f"k={k} for {queries} queries is {k * queries} records per side, over this server's cap of "
                                  f"{MAX_RECORDS}: ask for fewer queries (query=...) or a smaller k")
        if queries > self.max_queries():
            raise OverBudgetError(f"{queries} queries in one request is over this server's cap of {self.max_queries()} "
                                  f"({where}): name fewer with query=...")
        if passes * self.pass_cost(queries) > self.max_work:
            fixed = passes - (bootstrap or 0)
            cap = self.max_passes(queries) - fixed
            if bootstrap and cap >= 0:
                raise OverBudgetError(f"bootstrap={bootstrap} for {queries} queries is over this server's cap of "
                                      f"bootstrap={cap} ({where}): ask for fewer resamples or fewer queries")
            raise OverBudgetError(f"{passes} scoring passes for {queries} queries is over this server's cap of "
                                  f"{self.max_passes(queries)} ({where}): ask for fewer fractions or queries")


class ExpensiveLane:
    """Runs expensive work ``slots`` at a time in its own threads, refusing beyond ``waiting`` queued."""

    def __init__(self, slots: int = 1, waiting: int = 16):
        for name, value, low in (("--expensive-slots", slots, 1), ("--expensive-queue", waiting, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name} must be a whole number >= {low}, not {value!r}")
        self.slots, self.waiting = slots, waiting
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="daunce-expensive")
        self._lock = threading.Lock()
        self._held = 0  # running + queued

    @property
    def held(self) -> int:
        return self._held

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn`` in the lane, or raise :class:`BusyError` when it is full."""
        with self._lock:
            if self._held >= self.slots + self.waiting:
                raise BusyError(f"busy: {self.slots} expensive request(s) running and {self.waiting} queued (this server's cap, "
                                "--expensive-slots / --expensive-queue); retry shortly, or ask for less (smaller bootstrap, named queries)")
            self._held += 1
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Any) -> None:
        with self._lock:
            self._held -= 1

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the lane, awaited without holding a thread of the server's pool."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def expensive(self, endpoint: Callable[..., Any]) -> Callable[..., Any]:
        """A sync FastAPI endpoint, run in the lane (its signature, hence its parameters, kept)."""
        @functools.wraps(endpoint)
        async def in_lane(*args: Any, **kwargs: Any) -> Any:
            return await self.run(endpoint, *args, **kwargs)
        return in_lane

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
