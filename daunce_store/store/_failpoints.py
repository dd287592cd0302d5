"""Failpoints: a named place before every storage operation of append, compact and gc, where a test can stop
a process (kill it, pause it, or make the operation fail) at the N-th operation, so crash and race tests aim
instead of sleeping, and mean the same on a loaded machine as on a quiet one.

Every storage operation calls :meth:`Storage.op` with its kind and key just before it runs:

* ``put``: a record (create-if-absent or replace), a chunk write, the storage-clock probe;
* ``get``: a record read, or a chunk read by compaction and gc's read-back;
* ``list``, ``head``, ``delete``.

Two ways in:

* **In-process**: set ``storage.hook`` to a callable ``hook(kind, key)``; it runs before the operation (a
  scheduler can block there to choose which of several actors goes next).
* **Across processes**: the environment variable ``DAUNCE_STORE_FAILPOINT`` names one failpoint::

      DAUNCE_STORE_FAILPOINT="<action>@<kind>:<n>[:<key glob>]"

  fires ``action`` at the ``n``-th operation (1-based, counted in this process) of ``kind`` (or ``any``) whose
  key matches the glob (default ``*``). Actions: ``kill`` (SIGKILL this process: a crash, nothing flushed),
  ``pause`` (SIGSTOP this process until the test sends SIGCONT), ``enospc`` / ``eio`` (the operation raises
  ``OSError`` with that errno, as a full or failing disk would). ``DAUNCE_STORE_TRACE_OPS=<file>`` appends
  ``kind key`` lines for every operation, so a test can count a command's operations first and then aim at
  each one.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
from collections.abc import Callable

__all__ = ["FAILPOINT_ENV", "TRACE_ENV", "Hook", "env_hook", "parse_failpoint"]

FAILPOINT_ENV = "DAUNCE_STORE_FAILPOINT"
TRACE_ENV = "DAUNCE_STORE_TRACE_OPS"
KINDS = ("put", "get", "list", "head", "delete", "any")
ACTIONS = ("kill", "pause", "enospc", "eio")

Hook = Callable[[str, str], None]


def parse_failpoint(spec: str) -> tuple[str, str, int, str]:
    """``"kill@put:3:_daunce/fates/*"`` -> ("kill", "put", 3, "_daunce/fates/*"); ValueError naming the
    expected form otherwise."""
    try:
        action, rest = spec.strip().split("@", 1)
        kind, count, *glob = rest.split(":", 2)
        n = int(count)
    except ValueError:
        raise ValueError(f"{FAILPOINT_ENV}={spec!r}: expected '<action>@<kind>:<n>[:<key glob>]', e.g. 'kill@put:3'") from None
    if action not in ACTIONS or kind not in KINDS or n < 1:
        raise ValueError(f"{FAILPOINT_ENV}={spec!r}: action is one of {ACTIONS}, kind one of {KINDS}, n >= 1")
    return action, kind, n, glob[0] if glob else "*"


class _EnvHook:
    """The process-wide failpoint of ``DAUNCE_STORE_FAILPOINT`` (counts are per process, across handles)."""

    def __init__(self, spec: str | None, trace: str | None):
        self.rule = parse_failpoint(spec) if spec else None
        self.trace = trace
        self.seen = 0

    def __call__(self, kind: str, key: str) -> None:
        if self.trace:
            with open(self.trace, "a", encoding="utf-8") as f:
                f.write(f"{kind} {key}\n")
        if self.rule is None:
            return
        action, want, n, glob = self.rule
        if want not in (kind, "any") or not fnmatch.fnmatchcase(key, glob):
            return
        self.seen += 1
        if self.seen != n:
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "pause":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            code = errno.ENOSPC if action == "enospc" else errno.EIO
            raise OSError(code, os.strerror(code), key)


_env_hook: _EnvHook | None = None


def env_hook() -> Hook | None:
    """The hook the environment asks for, or None (the common case: no failpoint, no trace)."""
    global _env_hook
    spec, trace = os.environ.get(FAILPOINT_ENV), os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return None
    if _env_hook is None or (_env_hook.trace != trace):
        _env_hook = _EnvHook(spec, trace)
    return _env_hook
