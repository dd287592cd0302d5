"""Object-store faults: connection resets, lost replies, 500s and delays, injected by a TCP proxy
(tests/store/_fault_proxy.py) between obstore and moto's S3 server. Each fault fires on the N-th request
matching it, so every scenario is deterministic. After each one the store opens, every committed column
reads back bit-identical, and ``verify`` passes: a fault may cost an append, never a committed column."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

from _fault_proxy import Fault, FaultProxy
from _support import BUCKET, Location, assert_consistent, column, fill
from daunce_store import errors

pytestmark = pytest.mark.s3

N, M = 100, 4  # 100 rows in chunks of 16: seven chunk PUTs per train column
COMMIT = r"/_daunce/commits/p3\.json$"
FATE = r"/_daunce/fates/slot-"
SLOT = r"/_daunce/slots/"
TRAIN_CHUNK = r"/train/losses/c/"


@pytest.fixture(scope="module")
def proxy(s3_endpoint: dict[str, Any]) -> Iterator[FaultProxy]:
    moto = urlparse(s3_endpoint["endpoint"])
    proxy = FaultProxy((moto.hostname or "127.0.0.1", moto.port or 80))
    yield proxy
    proxy.close()


@pytest.fixture
def location(proxy: FaultProxy, s3_endpoint: dict[str, Any]) -> Location:
    """A fresh prefix reached through the proxy, holding a store with columns p0 and p1 committed (written
    straight to moto: through the proxy every request needs a new connection)."""
    proxy.plan()
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    store = Location("s3", root, s3_endpoint).init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]},
                                                   chunk_rows=16, capacity=16)
    fill(store, range(2))
    return Location("s3", root, {**s3_endpoint, "endpoint": proxy.endpoint})


def few_retries(location: Location) -> Location:
    """``location`` with obstore retrying twice, 10-50 ms apart: a persisting fault outlives the retries in
    milliseconds (obstore's default, 10 retries with jittered backoff, took 2 to 8 s here)."""
    retry = {"max_retries": 2, "backoff": {"init_backoff": dt.timedelta(milliseconds=10), "max_backoff": dt.timedelta(milliseconds=50)}}
    return Location(location.kind, location.root, {**(location.options or {}), "retry_config": retry})


def append_p3(location: Location) -> float:
    """Append column p3 (train and query set) through a fresh handle; seconds it took."""
    store = location.open()
    start = time.perf_counter()
    commit = store.append("p3", column(3, N), {"test": column(3, M, salt=1)}, metadata={"seed": 3})
    assert commit.perturbation == "p3"
    return time.perf_counter() - start


def check_intact(proxy: FaultProxy, location: Location, committed: list[int]) -> None:
    """With the faults off: the store opens, holds exactly ``committed``, bit-identical, and verifies."""
    proxy.plan()
    store = location.open()
    assert assert_consistent(store) == committed
    report = store.verify()
    assert report.ok, report


@pytest.mark.parametrize("record", [SLOT, FATE, COMMIT], ids=["slot", "fate", "commit"])
@pytest.mark.parametrize("action", ["reset", "drop_reply"])
def test_create_put_retried_after_connection_fault(proxy: FaultProxy, location: Location, record: str, action: str) -> None:
    """A create-if-absent PUT whose connection resets (before the request reaches the store, or after it
    landed, reply lost) is retried; a retry that finds the object holding our bytes succeeds."""
    (fault,) = proxy.plan(Fault(action, path=record, method="PUT"))
    seconds = append_p3(location)
    assert fault.fired == 1
    puts = proxy.requests("PUT", record)
    assert [r.action for r in puts[:2]] == [action, "forward"]  # one retry, no more
    if action == "drop_reply":  # the retry met our own object (412), and a GET proved it ours
        assert proxy.requests("GET", record)
    assert seconds < 5, f"append took {seconds:.1f} s"
    check_intact(proxy, location, [0, 1, 3])


def test_hung_commit_reply_is_found_fast(proxy: FaultProxy, location: Location) -> None:
    """The commit PUT lands but its reply never comes (the connection stays open): the record request
    times out in seconds, not obstore's 30 s default, and the retry finds our own commit."""
    proxy.plan(Fault("hang", path=COMMIT, method="PUT"))
    seconds = append_p3(location)
    assert [r.action for r in proxy.requests("PUT", COMMIT)] == ["hang", "forward"]
    assert seconds < 12, f"append took {seconds:.1f} s"
    check_intact(proxy, location, [0, 1, 3])


def test_users_own_timeout_is_kept(proxy: FaultProxy, location: Location) -> None:
    """A request timeout in the user's storage_options wins over the records' default."""
    assert location.options is not None
    location.options = {**location.options, "client_options": {"allow_http": True, "timeout": "1s"}}
    proxy.plan(Fault("hang", path=COMMIT, method="PUT"))
    seconds = append_p3(location)
    assert 1 <= seconds < 3, f"append took {seconds:.1f} s"
    check_intact(proxy, location, [0, 1, 3])


@pytest.mark.parametrize("action", ["reset", "drop_reply", "status"])
def test_chunk_put_faults_are_retried(proxy: FaultProxy, location: Location, action: str) -> None:
    """Chunk PUTs (whole-object overwrites, so idempotent) are retried by obstore itself after a reset,
    a lost reply or a 500: three faults on the second chunk, and the column commits intact."""
    (fault,) = proxy.plan(Fault(action, path=TRAIN_CHUNK, method="PUT", nth=2, times=3))
    append_p3(location)
    assert fault.fired == 3
    check_intact(proxy, location, [0, 1, 3])


@pytest.mark.parametrize("record", [SLOT, FATE, COMMIT], ids=["slot", "fate", "commit"])
def test_record_put_500s_are_retried(proxy: FaultProxy, location: Location, record: str) -> None:
    """obstore retries a 5xx even for a conditional PUT (nothing was forwarded: the retry creates it)."""
    (fault,) = proxy.plan(Fault("status", path=record, method="PUT", times=3))
    append_p3(location)
    assert fault.fired == 3
    check_intact(proxy, location, [0, 1, 3])


def test_delays_are_only_slow(proxy: FaultProxy, location: Location) -> None:
    """A slow store (0.5 s on a chunk, the fate and the commit PUT) is waited for, not mistaken for a fault."""
    proxy.plan(*(Fault("delay", path=p, method="PUT", seconds=0.5) for p in (TRAIN_CHUNK, FATE, COMMIT)))
    append_p3(location)
    assert [r.action for r in proxy.requests("PUT", COMMIT)] == ["delay"]
    check_intact(proxy, location, [0, 1, 3])


def test_adapter_put_retried_after_reset(proxy: FaultProxy, location: Location) -> None:
    """Raw bytes (a perturbation's weights) are a plain overwrite: retried by obstore."""
    proxy.plan(Fault("drop_reply", path=r"/_daunce/adapters/", method="PUT"))
    store = location.open()
    store.save_adapter("p3", b"weights" * 100)
    assert store.load_adapter("p3") == b"weights" * 100
    check_intact(proxy, location, [0, 1])


@pytest.mark.parametrize("action", ["status", "reset"])
def test_persistent_chunk_fault_is_one_clear_error(proxy: FaultProxy, location: Location, action: str) -> None:
    """A chunk PUT that fails past every retry ends the append in one StorageError naming the store and
    the operation and saying nothing is visible; the store is as before."""
    proxy.plan(Fault(action, path=TRAIN_CHUNK, method="PUT", nth=2, times=1000))
    with pytest.raises(errors.StorageError) as info:
        append_p3(few_retries(location))
    message = str(info.value)
    assert location.url() in message and "append of perturbation 'p3'" in message
    assert "nothing of 'p3' is visible" in message
    assert "\n" not in message, "one line, not obstore's debug dump"
    assert len(proxy.requests("PUT", TRAIN_CHUNK)) == 1 + 3  # the first chunk, then the second tried 1 + 2 times
    check_intact(proxy, location, [0, 1])


@pytest.mark.parametrize("action", ["status", "reset"])
def test_persistent_fate_fault_is_one_clear_error(proxy: FaultProxy, location: Location, action: str) -> None:
    """The decision record cannot be created: StorageError; the column stays invisible (its slot leaks
    until gc) and the store verifies. A 500 is retried by obstore (1 + 2 PUTs); a reset by put_if_absent (4
    PUTs), which then reads the key to see whether an attempt landed."""
    proxy.plan(Fault(action, path=FATE, method="PUT", times=1000))
    with pytest.raises(errors.StorageError, match="nothing of 'p3' is visible"):
        append_p3(few_retries(location))
    assert len(proxy.requests("PUT", FATE)) == {"status": 3, "reset": 4}[action]
    assert len(proxy.requests("GET", FATE)) == {"status": 0, "reset": 1}[action]
    check_intact(proxy, location, [0, 1])


def test_persistent_commit_fault_leaves_a_decided_column(proxy: FaultProxy, location: Location) -> None:
    """The fate landed but the commit record cannot be created: StorageError saying the column is decided
    committed; gc creates the record from the fate, and appending it again then says it is committed."""
    proxy.plan(Fault("status", path=COMMIT, method="PUT", times=1000))
    with pytest.raises(errors.StorageError, match="decided committed"):
        append_p3(few_retries(location))
    check_intact(proxy, location, [0, 1])
    location.open().gc()
    check_intact(proxy, location, [0, 1, 3])
    with pytest.raises(errors.AlreadyCommittedError):
        append_p3(location)
