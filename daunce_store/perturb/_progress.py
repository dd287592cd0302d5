"""Progress reporting for workers: rich bars on a terminal, plain flushed lines anywhere else (a file, a
pipe, a CI log, where rich's live display would print nothing until it stops), and events over a queue
from worker processes to the parent that shows them.

Both the in-process reporter and the parent of spawned workers feed the same :class:`_Board`, which
keeps the counts, prints the time estimate the runner measures, and decides when a plain line is due.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "Reporter", "NullReporter", "RichReporter", "QueueReporter", "serve_queue_progress", "current_reporter",
    "reporting", "PROGRESS_SECONDS_ENV", "DEFAULT_PROGRESS_SECONDS",
]

#: Environment variable: seconds between plain progress lines when the output is not a terminal.
PROGRESS_SECONDS_ENV = "DAUNCE_PROGRESS_SECONDS"
#: Its default: a log shows a sign of life at least this often (plus a line at each perturbation's start and end).
DEFAULT_PROGRESS_SECONDS = 30.0


class Reporter:
    """Receives progress events from a worker. Subclass and override what you need."""

    def perturbations(self, total: int, done: int) -> None:
        """K and how many are committed (store-wide), refreshed after each commit."""

    def begin(self, perturbation: str, phase: str, total: int) -> None:
        """A phase of ``total`` units starts: 'train steps', 'eval rows' of a set, a cache computation's batches."""

    def advance(self, n: int = 1) -> None:
        """``n`` units of the current phase are done."""

    def estimate(self, seconds: float, basis: str, measured: bool) -> None:
        """One perturbation takes about ``seconds`` on this worker; ``basis`` says what was timed.
        ``measured``: a whole perturbation was timed (else: extrapolated from its first training steps)."""

    def close(self) -> None:
        """The worker is finished."""


class NullReporter(Reporter):
    pass


_CURRENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("daunce_reporter", default=None)


def current_reporter() -> Reporter:
    """The reporter of the worker running in this process (a :class:`NullReporter` outside one).

    A factory that computes something slow before the perturbations start (hidden states to cache) shows
    its progress with ``cache_hidden_states(..., reporter=current_reporter())``: ``daunce perturb`` calls the
    factory inside :func:`reporting`, in each worker process."""
    return _CURRENT.get() or NullReporter()


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Make ``reporter`` the :func:`current_reporter` inside the block."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)


def progress_seconds() -> float:
    """The interval of plain progress lines: ``$DAUNCE_PROGRESS_SECONDS`` (0: a line at every event), else 30."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0.0 and math.isfinite(value)):
        from daunce_store.errors import InvalidInputError

        raise InvalidInputError(f"{PROGRESS_SECONDS_ENV}={raw!r}: give the seconds between progress lines, a number >= 0")
    return value


def duration(seconds: float) -> str:
    """'45 s', '3.2 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _clock_time(seconds: float) -> str:
    """'0:02:05', as rich's elapsed column."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Board:
    """The state of a run as its workers report it, shown as rich bars (a terminal or Jupyter) or as plain
    lines (anything else: one at each perturbation's start and commit, at the estimate, and otherwise at least
    every :func:`progress_seconds`, written and flushed at once)."""

    def __init__(self, console: Any = None, workers: int = 1, clock: Callable[[], float] = time.monotonic):
        from rich import get_console

        self.console = console or get_console()
        self.workers = max(1, int(workers))
        self.live = bool(self.console.is_terminal or self.console.is_jupyter)
        self.interval = progress_seconds()
        self._clock = clock
        self._start = self._last_line = clock()
        self._lock = threading.RLock()
        self.total: int | None = None
        self.done = 0
        self._phases: dict[str, list[Any]] = {}  # worker -> [label, phase, completed, total]
        self._seconds: float | None = None  # one perturbation's time: the mean of those measured, else the first guess
        self._measured: list[float] = []
        self._said_first = self._said_measured = False
        self._pending_measured: str | None = None  # basis of a measured estimate, said at the next commit
        self._progress: Any = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=False)
            self._progress.start()
            self._k = self._progress.add_task("perturbations", total=None)
            self._bars: dict[str, Any] = {}

    # --- events -----------------------------------------------------------------------------------------
    def handle(self, worker: str, kind: str, *args: Any) -> None:
        with self._lock:
            getattr(self, f"_on_{kind}")(worker, *args)

    def _on_perturbations(self, worker: str, total: int, done: int) -> None:
        first = self.total is None
        committed = done > self.done
        self.total, self.done = int(total), max(int(done), self.done)
        if self.live:
            self._progress.update(self._k, total=self.total, completed=self.done, description=self._k_description())
        if committed and self._pending_measured is not None:
            self._say_estimate(self._pending_measured)
            self._pending_measured = None
        if first or committed:
            self._plain(force=True)

    def _on_begin(self, worker: str, label: str, phase: str, total: int) -> None:
        self._phases[worker] = [label, phase, 0, int(total)]
        if self.live:
            description = f"  {worker + ' ' if self.workers > 1 else ''}{label} {phase}"
            if worker not in self._bars:
                self._bars[worker] = self._progress.add_task(description, total=None)
            self._progress.reset(self._bars[worker], total=total, visible=True, description=description)
        self._plain(force=phase.startswith("train"))  # a perturbation starts with its training

    def _on_advance(self, worker: str, n: int) -> None:
        if worker in self._phases:
            self._phases[worker][2] += int(n)
        if self.live and worker in self._bars:
            self._progress.advance(self._bars[worker], n)
        self._plain()

    def _on_estimate(self, worker: str, seconds: float, basis: str, measured: bool) -> None:
        if measured:
            self._measured.append(float(seconds))
            self._seconds = sum(self._measured) / len(self._measured)
        elif not self._measured:
            self._seconds = float(seconds)
        if self.live:
            self._progress.update(self._k, description=self._k_description())
        if measured and not self._said_measured:
            self._said_measured = True
            self._pending_measured = basis  # said with the count left once its column is committed
        elif not measured and not self._said_first:
            self._said_first = True
            self._say_estimate(basis)

    def _on_close(self, worker: str) -> None:
        self._phases.pop(worker, None)
        if self.live and worker in self._bars:
            self._progress.update(self._bars[worker], visible=False)

    def tick(self) -> None:
        """A plain line when none was written for the interval (called by a timer, or the queue loop)."""
        with self._lock:
            if self.interval > 0:  # at 0 every event prints already
                self._plain()

    def stop(self) -> None:
        with self._lock:
            if self.live and self._progress is not None:
                for bar in self._bars.values():
                    self._progress.update(bar, visible=False)
                self._progress.stop()
                self._progress = None

    # --- what is shown ------------------------------------------------------------------------------------
    def _left(self) -> str:
        if self._seconds is None or self.total is None:
            return ""
        left = max(0, self.total - self.done)
        return duration(math.ceil(left / self.workers) * self._seconds)

    def _k_description(self) -> str:
        left = self._left()
        return f"perturbations (≈ {left} left)" if left and self.done < (self.total or 0) else "perturbations"

    def _say_estimate(self, basis: str) -> None:
        if self.total is None or self._seconds is None:
            return
        left = max(0, self.total - self.done)
        if not left:
            return
        of = "" if left == self.total else f" of {self.total}"
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        self._line(f"estimate: {left}{of} perturbation{'s' if self.total > 1 else ''} ≈ {self._left()} here ({workers}); "
                   f"{basis}")

    def _plain(self, force: bool = False) -> None:
        if self.live or (not force and self._clock() - self._last_line < self.interval):
            return
        parts = [f"perturbations {self.done}/{self.total}"] if self.total is not None else []
        for worker, (label, phase, completed, total) in self._phases.items():
            who = f"{worker} " if self.workers > 1 else ""
            parts.append(f"{who}{label} {phase} {completed}/{total}")
        left = self._left()
        if left and self.done < (self.total or 0):
            parts.append(f"≈ {left} left")
        self._line(f"[{_clock_time(self._clock() - self._start)}] " + "; ".join(parts))

    def _line(self, text: str) -> None:
        if self.live:
            self._progress.console.print(text, highlight=False, markup=False)
            return
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        with contextlib.suppress(Exception):
            self.console.file.flush()
        self._last_line = self._clock()


class _Ticker:
    """Calls ``board.tick()`` every interval from a daemon thread (a plain line even while one training step
    takes minutes); nothing when the board draws live bars or the interval is 0 (then every event prints)."""

    def __init__(self, board: _Board):
        self._stop = threading.Event()
        self._thread = None
        if not board.live and board.interval > 0:
            self._thread = threading.Thread(target=self._run, args=(board,), name="daunce-progress", daemon=True)
            self._thread.start()

    def _run(self, board: _Board) -> None:
        while not self._stop.wait(board.interval):
            board.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class RichReporter(Reporter):
    """Progress in this process: rich bars (committed perturbations, units of the current phase) on a
    terminal, plain lines elsewhere; the runner's time estimate either way."""

    def __init__(self, console: Any = None, worker: str = ""):
        self._board = _Board(console)
        self._ticker = _Ticker(self._board)
        self._worker = worker
        self._closed = False

    def perturbations(self, total: int, done: int) -> None:
        self._board.handle(self._worker, "perturbations", total, done)

    def begin(self, perturbation: str, phase: str, total: int) -> None:
        self._board.handle(self._worker, "begin", perturbation, phase, total)

    def advance(self, n: int = 1) -> None:
        self._board.handle(self._worker, "advance", n)

    def estimate(self, seconds: float, basis: str, measured: bool) -> None:
        self._board.handle(self._worker, "estimate", seconds, basis, measured)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ticker.stop()
        self._board.handle(self._worker, "close")
        self._board.stop()


class QueueReporter(Reporter):
    """Sends events to a parent process (``serve_queue_progress`` shows them)."""

    def __init__(self, queue: Any, worker: str):
        self._queue = queue
        self._worker = worker

    def _send(self, *event: Any) -> None:
        try:
            self._queue.put_nowait((self._worker, *event))
        except Exception:  # a full or closed queue never stops the training
            pass

    def perturbations(self, total: int, done: int) -> None:
        self._send("perturbations", total, done)

    def begin(self, perturbation: str, phase: str, total: int) -> None:
        self._send("begin", perturbation, phase, total)

    def advance(self, n: int = 1) -> None:
        self._send("advance", n)

    def estimate(self, seconds: float, basis: str, measured: bool) -> None:
        self._send("estimate", seconds, basis, measured)

    def close(self) -> None:
        self._send("close")


def serve_queue_progress(queue: Any, processes: list[Any], console: Any = None) -> None:
    """Show the events of worker processes until they all exit: one perturbation bar and one bar per worker
    (or plain lines when the console is not a terminal)."""
    import queue as _queue

    board = _Board(console, workers=len(processes))
    try:
        while True:
            board.tick()
            try:
                worker, kind, *args = queue.get(timeout=0.2)
            except _queue.Empty:
                if not any(p.is_alive() for p in processes):
                    return
                continue
            board.handle(worker, kind, *args)
    finally:
        board.stop()
