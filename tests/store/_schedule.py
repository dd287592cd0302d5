"""A deterministic scheduler for race tests: several actors (threads, each with its own store handle) stop at
every storage operation (the failpoint hook of ``Storage.op``), and only the actor the schedule picks runs to
its next operation. So an interleaving is a list of choices, the same on a loaded machine as on a quiet one,
and exploring interleavings means enumerating or seeding those choices, never sleeping.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

# A guard against a deadlocked schedule (a bug in the scheduler or an actor blocked outside its hooks): the
# test fails with the trace instead of hanging CI. Not a timing assumption: a healthy step takes milliseconds.
STALL_SECONDS = 120.0


class Picker:
    """Chooses which waiting actor runs next. ``random``: uniformly at each step (seeded); ``pct``: the
    PCT strategy (random priorities, ``depth - 1`` priority changes at random steps), which finds bugs of
    depth d with known probability; ``first``: always the same actor order (sequential runs)."""

    def __init__(self, strategy: str, seed: int, actors: list[str], *, depth: int = 3, horizon: int = 200):
        self.strategy, self.rng = strategy, random.Random(seed)
        self.priority = {a: p for p, a in enumerate(self.rng.sample(actors, len(actors)))}
        self.changes = set(self.rng.sample(range(1, horizon), depth - 1)) if strategy == "pct" else set()
        self.low = -1

    def __call__(self, waiting: list[str], step: int) -> str:
        if self.strategy == "random":
            return self.rng.choice(waiting)
        best = max(waiting, key=lambda a: self.priority[a])
        if step in self.changes:  # the running actor drops below everyone: a preemption at a random point
            self.priority[best], self.low = self.low, self.low - 1
            best = max(waiting, key=lambda a: self.priority[a])
        return best


class OnePreemption:
    """Systematic schedules with at most one preemption (CHESS's preemption bounding): actors run one at a
    time to completion in ``order``, except that at step ``at`` the running actor is preempted for ``to``,
    which then runs to completion. Enumerating every order, step and target covers all such schedules; most
    races need one or two preemptions to show."""

    def __init__(self, order: list[str], at: int | None = None, to: str | None = None):
        self.order, self.at, self.to = order, at, to
        self.current: str | None = None

    def __call__(self, waiting: list[str], step: int) -> str:
        if step == self.at and self.to in waiting:
            self.current = self.to
        elif self.current not in waiting:
            self.current = next(a for a in self.order if a in waiting)
        return self.current


def run_schedule(actors: dict[str, tuple[Any, Callable[[], Any]]], pick: Callable[[list[str], int], str]) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Run ``actors`` (name -> (storage whose hook to take, function)) one storage operation at a time, in
    the order ``pick`` chooses among the actors waiting at an operation. Returns each actor's outcome (its
    return value or the exception it raised) and the trace of (actor, kind, key) operations in order."""
    cond = threading.Condition()
    waiting: dict[str, tuple[str, str]] = {}
    done: set[str] = set()
    go: list[str | None] = [None]
    outcomes: dict[str, Any] = {}
    trace: list[tuple[str, str, str]] = []

    def gate(name: str) -> Callable[[str, str], None]:
        def hook(kind: str, key: str) -> None:
            with cond:
                waiting[name] = (kind, key)
                cond.notify_all()
                if not cond.wait_for(lambda: go[0] == name, timeout=STALL_SECONDS):
                    raise RuntimeError(f"schedule stalled waiting to run {name} at {kind} {key}; trace: {trace[-20:]}")
                go[0] = None
                cond.notify_all()
        return hook

    def body(name: str, fn: Callable[[], Any]) -> None:
        try:
            outcomes[name] = fn()
        except BaseException as e:  # noqa: BLE001 - the outcome is the test's to judge
            outcomes[name] = e
        finally:
            with cond:
                done.add(name)
                cond.notify_all()

    for name, (storage, _) in actors.items():
        storage.hook = gate(name)
    threads = [threading.Thread(target=body, args=(name, fn), daemon=True) for name, (_, fn) in actors.items()]
    for t in threads:
        t.start()
    try:
        step = 0
        while True:
            with cond:
                settled = lambda: go[0] is None and all(a in waiting or a in done for a in actors)  # noqa: E731
                if not cond.wait_for(settled, timeout=STALL_SECONDS):
                    raise RuntimeError(f"schedule stalled at step {step}; trace: {trace[-20:]}")
                if len(done) == len(actors):
                    break
                name = pick(sorted(waiting), step)
                kind, key = waiting.pop(name)
                trace.append((name, kind, key))
                go[0] = name
                cond.notify_all()
            step += 1
    finally:
        for t in threads:
            t.join(timeout=STALL_SECONDS)
        for storage, _ in actors.values():
            storage.hook = None
    return outcomes, trace
