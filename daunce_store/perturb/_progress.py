"""Progress reporting for workers: rich bars in one process, or events over a queue to a parent process."""

from __future__ import annotations

from typing import Any

__all__ = ["Reporter", "NullReporter", "RichReporter", "QueueReporter", "serve_queue_progress"]


class Reporter:
    """Receives progress events from a worker. Subclass and override what you need."""

    def perturbations(self, total: int, done: int) -> None:
        """K and how many are committed (store-wide), refreshed after each commit."""

    def begin(self, perturbation: str, phase: str, total: int) -> None:
        """A phase ('train', 'eval train', 'eval <query set>') of ``total`` batches starts."""

    def advance(self, n: int = 1) -> None:
        """``n`` batches of the current phase are done."""

    def close(self) -> None:
        """The worker is finished."""


class NullReporter(Reporter):
    pass


class RichReporter(Reporter):
    """Two rich bars in this process: committed perturbations, and batches of the current phase."""

    def __init__(self, console: Any = None, worker: str = ""):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self._progress.start()
        self._k = self._progress.add_task("perturbations", total=None)
        self._batch = self._progress.add_task("batches", total=None, visible=False)
        self._worker = worker

    def perturbations(self, total: int, done: int) -> None:
        self._progress.update(self._k, total=total, completed=done)

    def begin(self, perturbation: str, phase: str, total: int) -> None:
        self._progress.reset(self._batch, total=total, visible=True, description=f"  {perturbation} {phase}")

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._batch, n)

    def close(self) -> None:
        self._progress.update(self._batch, visible=False)
        self._progress.stop()


class QueueReporter(Reporter):
    """Sends events to a parent process (``serve_queue_progress`` draws them)."""

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

    def close(self) -> None:
        self._send("close")


def serve_queue_progress(queue: Any, processes: list[Any], console: Any = None) -> None:
    """Draw the events of worker processes until they all exit: one perturbation bar, one batch bar per worker."""
    import queue as _queue

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        k_task = progress.add_task("perturbations", total=None)
        bars: dict[str, Any] = {}
        while True:
            try:
                worker, kind, *args = queue.get(timeout=0.2)
            except _queue.Empty:
                if not any(p.is_alive() for p in processes):
                    return
                continue
            if kind == "perturbations":
                progress.update(k_task, total=args[0], completed=max(args[1], progress.tasks[k_task].completed))
                continue
            if worker not in bars:
                bars[worker] = progress.add_task(worker, total=None)
            if kind == "begin":
                progress.reset(bars[worker], total=args[2], description=f"  {worker} {args[0]} {args[1]}")
            elif kind == "advance":
                progress.advance(bars[worker], args[0])
            elif kind == "close":
                progress.update(bars[worker], visible=False)
