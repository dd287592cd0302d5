"""The commit log's records: what a commit, a snapshot and a lease are, and the three ways records are
used — claimed by number, cached once read, and (leases) alive or not.

Every record is a small JSON object created with the storage's one atomic primitive, create-if-absent
(:meth:`Storage.put_if_absent`); commit records and pack manifests are never rewritten afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np

from daunce_store.errors import CorruptRecordError, InvalidInputError
from daunce_store.store._storage import Storage

__all__ = [
    "Commit",
    "Snapshot",
    "Lease",
    "ImmutableRecords",
    "check_perturbation_id",
    "check_query_set_name",
    "claim_numbered",
    "default_worker_name",
    "iso",
    "lease_holder_gone",
    "lease_is_live",
    "lease_state",
    "now_iso",
    "perturbation_id",
    "process_start_time",
    "record_number",
]

T = TypeVar("T")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


# Names become file and object names (``commits/<id>.json``, ``queries/<name>/``); 200 characters keeps
# every key under the common 255-byte limit for one path component.
MAX_NAME_LENGTH = 200
# "train" is the ``set`` value of train rows in exports, so no query set may take it.
RESERVED_QUERY_SET_NAMES = frozenset({"train"})


def perturbation_id(k: int) -> str:
    """The canonical id of perturbation k: ``f"{k:06d}"`` (``000017``), as the runner writes it."""
    return f"{int(k):06d}"


def check_perturbation_id(pid: object) -> str:
    """A perturbation id in canonical form. Ids are strings of letters, digits, '_', '-', '.'; an id of
    digits only (or an int) names perturbation k, so ``3``, ``03`` and ``000003`` are one id, written
    ``000003``: a black-box column appended as ``3`` can never sit beside the runner's ``000003``."""
    if isinstance(pid, bool) or not isinstance(pid, (str, int, np.integer)):
        raise InvalidInputError(f"perturbation id {pid!r} must be a string or an int, not {type(pid).__name__}")
    text = str(pid)
    if not text or set(text) - _NAME_CHARS or text.startswith("."):
        raise InvalidInputError(
            f"perturbation id {pid!r} must be non-empty and use only letters, digits, '_', '-', '.' (not starting with '.')"
        )
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"perturbation id {text[:20]!r}... is {len(text)} characters; the limit is {MAX_NAME_LENGTH}")
    return perturbation_id(int(text)) if text.isdigit() else text


def check_query_set_name(name: object) -> str:
    if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
        raise InvalidInputError(
            f"query-set name {name!r} is not a plain identifier; use letters, digits and '_' "
            "(not starting with a digit), e.g. 'test' or 'backdoor_queries'"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"query-set name {name[:20]!r}... is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    if name in RESERVED_QUERY_SET_NAMES:
        raise InvalidInputError(
            f"query-set name {name!r} is reserved (exports label train rows with it); pick another, e.g. 'train_probe'"
        )
    return name


def default_worker_name() -> str:
    """``host:pid``, plus the cluster launcher's task when there is one, so that leases and commits say
    which array task made them (a requeued task keeps its suffix; host and pid tell its runs apart):
    ``:slurm-<job>_<task>`` in a SLURM array (SLURM's own ``%A_%a``), ``:slurm-<job>`` in another SLURM
    job, ``:k8s-<index>`` in a Kubernetes Indexed Job (``JOB_COMPLETION_INDEX``). Environment variables
    only: the store imports no launcher (the runner adds a Dask worker's name itself)."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    env = os.environ
    job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if task:  # a string: "0" counts
        name += f":slurm-{job}_{task}" if job else f":slurm-{task}"
    elif env.get("SLURM_JOB_ID"):
        name += f":slurm-{env['SLURM_JOB_ID']}"
    if env.get("JOB_COMPLETION_INDEX"):
        name += f":k8s-{env['JOB_COMPLETION_INDEX']}"
    return name


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()



@dataclasses.dataclass(frozen=True)
class Commit:
    """One committed perturbation column."""

    perturbation: str
    slot: int
    query_sets: tuple[str, ...]
    committed_at: str
    metadata: dict[str, Any]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Commit:
        return cls(
            perturbation=rec["perturbation"],
            slot=int(rec["slot"]),
            query_sets=tuple(rec.get("query_sets", ())),
            committed_at=rec.get("committed_at", ""),
            metadata=rec.get("metadata", {}),
        )


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent view: the committed columns at one moment, in slot order.

    ``query_slots[name]`` are the slots whose losses exist for that query set.
    """

    commits: tuple[Commit, ...]
    query_slots: Mapping[str, tuple[int, ...]]

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(c.slot for c in self.commits)

    @property
    def perturbations(self) -> tuple[str, ...]:
        return tuple(c.perturbation for c in self.commits)

    def __len__(self) -> int:
        return len(self.commits)


@dataclasses.dataclass
class Lease:
    """A worker's claim on a perturbation id; it expires unless renewed.

    ``host``, ``pid`` and ``started`` (the process's start time, unix seconds) name the process that took
    it, so that a worker on the same host can tell at once that the holder is gone (records written before
    these fields existed read as None: such a lease only expires). ``taken_over`` is not stored: it is the
    record this lease replaced when :meth:`~daunce_store.LossStore.claim` took over a stale lease (with its
    ``state``, ``expired`` or ``holder-gone``), else None.
    """

    perturbation: str
    generation: int
    worker: str
    token: str
    expires_at: float
    host: str | None = None
    pid: int | None = None
    started: float | None = None
    taken_over: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        rec = dataclasses.asdict(self)
        del rec["taken_over"]
        return rec


def iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


def commit_from_record(key: str, rec: dict[str, Any], url: str) -> Commit:
    try:
        return Commit.from_record(rec)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(
            f"commit record {key!r} of {url} lacks or garbles {e}; it was not written by daunce-store "
            "(restore it from a copy)"
        ) from None


def lease_is_live(record: dict[str, Any] | None, now: float) -> bool:
    """A lease record that still holds its perturbation: not released, not expired at ``now``, and not
    held by a process of this host that is gone (:func:`lease_state`)."""
    return record is not None and lease_state(record, now) == "live"


def lease_state(record: dict[str, Any], now: float) -> str:
    """``released``, ``expired`` (past ``expires_at``), ``holder-gone`` (its process, on this host, has
    exited: the lease is as good as expired) or ``live``."""
    if record.get("released"):
        return "released"
    if float(record["expires_at"]) < now:
        return "expired"
    return "holder-gone" if lease_holder_gone(record) else "live"


def lease_holder_gone(record: Mapping[str, Any]) -> bool:
    """True only when the lease's holder ran on this host (``socket.gethostname()``) and its process is
    gone: no process has its pid, the process with its pid is a zombie, or that process started at
    another time than the recorded ``started`` (the pid was reused). False whenever it cannot tell
    (another host, a record without host/pid, no way to read process start times): such a lease waits
    for its expiry. Hosts sharing a store must have distinct host names."""
    host, pid = record.get("host"), record.get("pid")
    if host is None or pid is None or host != socket.gethostname() or os.name != "posix":
        return False  # os.kill(pid, 0) is only a probe on POSIX (on Windows signal 0 is CTRL_C_EVENT)
    try:
        pid = int(pid)
        if pid <= 0:  # kill(0 or -n, 0) would probe process groups, not a process
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # the pid exists, owned by another user: decide by its start time
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    try:
        started, zombie = _process_start(pid)
    except ProcessLookupError:
        return True  # exited between the probe and the read
    except OSError:
        return False
    if zombie:
        return True  # killed, not yet reaped by its parent: it will never renew
    recorded = record.get("started")
    # Start times are unix seconds from boot time + ticks; 1 s absorbs tick rounding and clock slew.
    return recorded is not None and started is not None and abs(started - float(recorded)) > 1.0


def process_start_time(pid: int | None = None) -> float | None:
    """The start time (unix seconds) of process ``pid`` (default: this one), or None where it cannot be
    read (neither /proc nor psutil)."""
    try:
        return _process_start(os.getpid() if pid is None else pid)[0]
    except OSError:
        return None


def _process_start(pid: int) -> tuple[float | None, bool]:
    """(start time in unix seconds or None if unknown, is a zombie); ProcessLookupError if no such process."""
    proc = f"/proc/{pid}/stat"
    if os.path.exists("/proc/stat"):  # Linux: field 22 of /proc/<pid>/stat is the start, in ticks after boot
        try:
            with open(proc, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        with open("/proc/stat", "rb") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return round(btime + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2), fields[0] == b"Z"
    try:
        import psutil
    except ImportError:
        return None, False
    try:
        p = psutil.Process(pid)
        return round(p.create_time(), 2), p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    except psutil.Error:
        return None, False


_NUMBERED = re.compile(r"(?:(?:slot|group|copy)-)?(\d{8})(?:\.\w+)?\.json")


def record_number(key: str) -> int | None:
    """The number of a numbered record (``slots/00000003.json``, ``fates/slot-00000003.json``, ...), or None
    for a key that is not one (a stray file: ``verify`` notes it, nothing else acts on it)."""
    match = _NUMBERED.fullmatch(key.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def claim_numbered(storage: Storage, prefix: str, record: dict[str, Any], limit: int) -> int | None:
    """Create the next free record ``{prefix}/{i:08d}.json`` (i < ``limit``) with create-if-absent, starting
    after the highest one listed; returns i, or None when all are taken. Of racing claimants each gets a
    different number (the nonce makes every claim's bytes its own: see :meth:`Storage.put_if_absent`)."""
    record = {**record, "nonce": uuid.uuid4().hex}
    taken = storage.list(prefix)
    number = max((n for n in map(record_number, taken) if n is not None), default=-1) + 1
    while number < limit:
        if storage.put_if_absent(f"{prefix}/{number:08d}.json", record):
            return number
        number += 1
    return None


class ImmutableRecords(Generic[T]):
    """The records under a prefix that are created once and never rewritten (commits, pack manifests):
    each is fetched and parsed once per handle, so a refresh costs one listing plus the new records."""

    def __init__(self, storage: Storage, prefix: str, parse: Callable[[str, dict[str, Any]], T],
                 keep: Callable[[str], bool] | None = None):
        self._storage, self._prefix, self._parse, self._keep = storage, prefix, parse, keep
        self._seen: dict[str, T] = {}

    def refresh(self) -> dict[str, T]:
        """key -> parsed record, for every record listed now (in key order; ``keep`` filters the keys)."""
        keys = [k for k in self._storage.list(self._prefix) if self._keep is None or self._keep(k)]
        new = [k for k in keys if k not in self._seen]
        for key, rec in zip(new, self._storage.get_many(new)):
            if rec is not None:
                self._seen[key] = self._parse(key, rec)
        return {k: self._seen[k] for k in keys if k in self._seen}
