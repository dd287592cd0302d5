"""Scoring on a Dask cluster gives the single-process answer exactly: the same indices in the same order
and the same scores, for any partitioning, ties included; across a worker killed mid-scan; on local disk
and on S3; and columns committed while a query runs stay out of it. A bad or dead scheduler address is a
clear error within a bounded time."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app
from daunce_store.errors import DaunceStoreError, InvalidInputError, MissingDependencyError
from daunce_store.scoring import _distributed
from daunce_store.scoring._distributed import merge_partials, partition_bounds
from daunce_store.scoring._measures import gram_for
from daunce_store.store import PerturbationDraw

pytestmark = pytest.mark.dask

N, M, K, SEED, CHUNK = 1000, 6, 12, 3, 64
TIED = (10, 130, 500, 999)  # identical rows, in different partitions: ties the merge must order by row


def _losses() -> tuple[np.ndarray, np.ndarray, list[PerturbationDraw]]:
    rng = np.random.default_rng(1)
    draws = [PerturbationDraw(SEED, k, ratio=0.5) for k in range(K)]
    w = np.stack([d.linear_weights(0, N)[0] / d.linear_weights(0, N)[1] for d in draws], axis=1)
    g, gq = rng.standard_normal((N, 5)), rng.standard_normal((M, 5))
    dtheta = g.T @ w
    train = (1.0 + g @ dtheta + 1e-3 * rng.standard_normal((N, K))).astype(np.float32)
    query = (1.0 + gq @ dtheta + 1e-3 * rng.standard_normal((M, K))).astype(np.float32)
    train[list(TIED)] = train[TIED[0]]
    train[7] = 0.5  # constant: every score 0, a tie with anything else scoring 0
    return train, query, draws


def _build(url: str, storage_options: dict | None = None) -> daunce_store.Store:
    train, query, draws = _losses()
    store = daunce_store.init(url, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, seed=SEED,
                              chunk_rows=CHUNK, storage_options=storage_options)
    for k, d in enumerate(draws):
        store.append(f"{k:06d}", train[:, k], {"test": query[:, k]}, metadata={"draw": d.to_metadata()})
    return store


@pytest.fixture(scope="module")
def local_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("dask") / "s.zarr")
    _build(url)
    return url


def _same(got: daunce_store.scoring.Attribution, want: daunce_store.scoring.Attribution) -> None:
    assert got.queries == want.queries and got.measure == want.measure and got.num_columns == want.num_columns
    assert set(got.indices) == set(want.indices)
    for side in want.indices:
        np.testing.assert_array_equal(got.indices[side], want.indices[side])
        np.testing.assert_array_equal(got.scores[side], want.scores[side])  # the same blocks, the same bits
    assert got.records() == want.records()


# --- the pure parts -------------------------------------------------------------------------------------
def _reference(scores: np.ndarray, rows: np.ndarray, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Top-k per query (columns of ``scores``, (R, m)) of the given global ``rows``, by the kernels' order."""
    out = {}
    for side, key in (("pos", -scores), ("neg", scores)):
        idx, val = [], []
        for j in range(scores.shape[1]):
            order = np.lexsort((rows, key[:, j]))[:k]
            idx.append(rows[order])
            val.append(scores[order, j])
        out[side] = (np.array(idx, np.int64), np.array(val, np.float32))
    return out


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 60), m=st.integers(1, 3), k=st.integers(1, 12), levels=st.integers(1, 4),
    data=st.data(),
)
def test_merge_of_any_partition_in_any_order_is_the_topk(n, m, k, levels, data):
    """Partial top-k lists of a random partition, merged in a random tree: the top-k of the whole."""
    k = min(k, n)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(-levels, levels + 1, size=(n, m)).astype(np.float32)  # few values: many ties
    cuts = sorted(data.draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=6)) if n > 1 else [])
    bounds = list(zip([0, *cuts], [*cuts, n]))
    parts = [_reference(scores[r0:r1], np.arange(r0, r1), min(k, r1 - r0)) for r0, r1 in bounds]
    while len(parts) > 1:  # merge a random pair of what is left
        i, j = sorted(rng.choice(len(parts), 2, replace=False))
        b, a = parts.pop(j), parts.pop(i)
        parts.append(merge_partials(a, b, k) if rng.random() < 0.5 else merge_partials(b, a, k))
    want = _reference(scores, np.arange(n), k)
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(parts[0][side][0], want[side][0])
        np.testing.assert_array_equal(parts[0][side][1], want[side][1])


def test_partition_bounds_are_aligned_and_cover_the_rows():
    assert partition_bounds(1000, 64, 200) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert partition_bounds(1000, 64, 1) == [(r, min(r + 64, 1000)) for r in range(0, 1000, 64)]
    assert partition_bounds(10, 64) == [(0, 10)]
    for bad in (0, -5, 2.5, True, "100"):
        with pytest.raises(InvalidInputError, match="partition_rows"):
            partition_bounds(100, 8, bad)


# --- on the cluster ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["cov", "corr", "nystrom", "whitened", "nystrom-corr"])
def test_topk_equals_single_process_for_any_partitioning(cluster, local_url, measure):
    want = daunce_store.open(local_url, "r").topk("test", k=9, measure=measure, block_rows=CHUNK)
    for partition_rows in (CHUNK, 200, 10**6):
        store = daunce_store.open(local_url, "r")  # a fresh handle: its Gram comes from the cluster
        got = store.topk("test", k=9, measure=measure, block_rows=CHUNK, client=cluster, partition_rows=partition_rows)
        _same(got, want)
    # The tied rows come out in row order wherever they are ranked.
    for side in ("pos", "neg"):
        for row in want.indices[side]:
            listed = [i for i in row if i in TIED]
            assert listed == sorted(listed)


def test_influence_self_influence_and_a_column_subset(cluster, local_url):
    single = daunce_store.open(local_url, "r")
    store = daunce_store.open(local_url, "r")
    opts = dict(block_rows=CHUNK)
    _same(store.influence("test", ["q1", "q4"], k=7, measure="whitened", client=cluster, partition_rows=128),
          single.influence("test", ["q1", "q4"], k=7, measure="whitened"))
    _same(store.topk("test", ["q2"], k=5, measure="nystrom", side="neg", columns=[0, 3, 3, 7, 11], client=cluster,
                     partition_rows=300, **opts),
          single.topk("test", ["q2"], k=5, measure="nystrom", side="neg", columns=[0, 3, 3, 7, 11], **opts))
    for measure in ("cov", "nystrom"):
        _same(store.self_influence(k=11, measure=measure, side="both", client=cluster, partition_rows=CHUNK, **opts),
              single.self_influence(k=11, measure=measure, side="both", **opts))


def test_the_gram_is_summed_on_the_cluster_with_the_same_bits(cluster, local_url):
    store = daunce_store.open(local_url, "r")
    store.topk("test", k=3, measure="nystrom", block_rows=CHUNK, client=cluster, partition_rows=CHUNK)
    (key, gram), = store.derived_cache.items()  # only the entry gram_for looks up: the driver did not scan
    fresh = daunce_store.open(local_url, "r")
    want = gram_for(fresh, fresh.snapshot(), fresh.committed_slots(), "nystrom", CHUNK)
    assert key[:2] == ("gram", "nystrom")
    np.testing.assert_array_equal(gram.matrix, want.matrix)


def test_dask_array_topk_agrees(cluster, local_url):
    """An independent oracle: dask.array's topk/argtopk on the dense score matrix (no ties among the
    leaders of these queries; its tie order is unspecified)."""
    da = pytest.importorskip("dask.array")
    store = daunce_store.open(local_url, "r")
    dense = store.scores("test", measure="whitened").to_numpy()  # (n, m)
    got = store.topk("test", k=8, measure="whitened", client=cluster, partition_rows=CHUNK, block_rows=CHUNK)
    x = da.from_array(dense.T, chunks=(M, 100))  # per query, over chunks of train rows
    for side, k in (("pos", 8), ("neg", -8)):
        values = da.topk(x, k, axis=1).compute(scheduler="sync")
        rows = da.argtopk(x, k, axis=1).compute(scheduler="sync")
        np.testing.assert_allclose(got.scores[side], values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.indices[side], rows)


@pytest.mark.s3
def test_a_store_on_s3(cluster, s3_location):
    root, options = s3_location
    _build(f"{root}/dask.zarr", options)
    store = daunce_store.open(f"{root}/dask.zarr", "r", storage_options=options)  # the workers get these options
    for measure in ("corr", "whitened"):
        want = daunce_store.open(f"{root}/dask.zarr", "r", storage_options=options).topk("test", k=6, measure=measure, block_rows=CHUNK)
        _same(store.topk("test", k=6, measure=measure, block_rows=CHUNK, client=cluster, partition_rows=256), want)


# Hooks installed in the worker processes with client.run (this module is pickled by value).
def _install(hook: str, flag: str, url: str) -> None:
    from daunce_store.store import StoreRows as d

    original = d.blocks
    d._original_blocks = original

    def blocks(self, block_rows=None, row_range=None, *args, **kwargs):
        first = True
        r0 = 0 if row_range is None else row_range[0]
        for item in original(self, block_rows, row_range, *args, **kwargs):
            yield item
            if first and r0 > 0:
                first = False
                try:
                    fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    continue
                os.close(fd)
                if hook == "kill":  # mid-scan: one block of this partition read, the rest not
                    os.kill(os.getpid(), signal.SIGKILL)
                else:  # a new column lands while the query runs
                    store = daunce_store.open(url, "a")
                    n = store.n_train
                    loud = np.random.default_rng(9).standard_normal(n).astype(np.float32) * 100
                    store.append("late", loud, {"test": loud[: len(store.query_ids("test"))]})

    d.blocks = blocks
    os.environ["DAUNCE_STORE_FUSED"] = "0"  # the hook hangs on the block path: no fused read-and-score pass


def _uninstall() -> None:
    from daunce_store.store import StoreRows as d

    os.environ.pop("DAUNCE_STORE_FUSED", None)
    original = d.__dict__.get("_original_blocks")
    if original is not None:
        d.blocks = original
        del d._original_blocks


@pytest.fixture
def worker_hook(cluster, monkeypatch):
    """Install a hook in the workers' block path; the driver scores on the block path too, so the bits
    of the answers it compares are made the same way (the fused pass may round the last bit differently)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv("DAUNCE_STORE_FUSED", "0")
    yield lambda hook, flag, url: cluster.run(_install, hook, flag, url)
    cluster.run(_uninstall)


def test_a_worker_killed_mid_scan_changes_nothing(cluster, local_url, tmp_path, worker_hook):
    want = daunce_store.open(local_url, "r").topk("test", k=9, measure="nystrom", block_rows=CHUNK)
    flag = tmp_path / "killed"
    worker_hook("kill", str(flag), local_url)
    got = daunce_store.open(local_url, "r").topk("test", k=9, measure="nystrom", block_rows=CHUNK, client=cluster,
                                                  partition_rows=256)
    assert flag.exists()  # a worker did die
    _same(got, want)
    cluster.wait_for_workers(2, timeout=60)


def test_columns_landing_during_a_query_stay_out_of_it(cluster, tmp_path, worker_hook):
    url = str(tmp_path / "s.zarr")
    _build(url)
    store = daunce_store.open(url, "r")
    want = store.topk("test", k=9, measure="whitened", block_rows=CHUNK)
    flag = tmp_path / "appended"
    worker_hook("append", str(flag), url)
    got = store.topk("test", k=9, measure="whitened", block_rows=CHUNK, client=cluster, partition_rows=256)
    assert flag.exists() and store.num_columns() == K + 1  # the column did land mid-query ...
    _same(got, want)  # ... and the query scored the snapshot it started with
    after = store.topk("test", k=9, measure="whitened", block_rows=CHUNK)
    assert after.num_columns == K + 1 and not np.array_equal(after.indices["pos"], want.indices["pos"])


# --- errors and the command line -----------------------------------------------------------------------
def test_bad_and_dead_scheduler_addresses_fail_fast(local_url, monkeypatch):
    monkeypatch.setattr(_distributed, "CONNECT_TIMEOUT_S", 2.0)
    store = daunce_store.open(local_url, "r")
    with pytest.raises(InvalidInputError, match="not a Dask scheduler address"):
        store.topk("test", k=3, client="tcp://127.0.0.1:notaport")
    start = time.monotonic()
    with pytest.raises(DaunceStoreError, match="no Dask scheduler answered at 'tcp://127.0.0.1:9'"):
        store.topk("test", k=3, client="tcp://127.0.0.1:9")  # the discard port: nothing listens
    assert time.monotonic() - start < 20
    with pytest.raises(InvalidInputError, match="client must be"):
        store.topk("test", k=3, client=42)
    with pytest.raises(InvalidInputError, match="give client="):
        store.topk("test", k=3, partition_rows=100)
    with pytest.raises(InvalidInputError, match="partition_rows"):
        store.topk("test", k=3, client="tcp://127.0.0.1:9", partition_rows=0)  # checked before connecting
    mem = daunce_store.init("memory://x", ["a", "b", "c"], {"test": ["q"]})
    for c in range(2):
        mem.append(f"p{c}", np.arange(3, dtype=np.float32) * (c + 1), {"test": np.ones(1, np.float32) * c})
    with pytest.raises(InvalidInputError, match="in-memory store"):
        mem.self_influence(k=1, measure="cov", client="tcp://127.0.0.1:9")


def test_without_dask_the_error_names_the_extra(local_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(MissingDependencyError, match=r"daunce-store\[dask\]"):
        daunce_store.open(local_url, "r").topk("test", k=3, client="tcp://127.0.0.1:9")


def test_cli_scheduler(cluster, local_url):
    runner = CliRunner()
    address = cluster.scheduler.address
    for args in (["topk", local_url, "--query-set", "test", "-k", "4", "--measure", "nystrom-corr"],
                 ["influence", local_url, "--query-set", "test", "-k", "4"],
                 ["self-influence", local_url, "-k", "4", "--side", "both"]):
        plain = runner.invoke(app, [*args, "--format", "json"])
        dist = runner.invoke(app, [*args, "--format", "json", "--scheduler", address])
        assert plain.exit_code == 0 and dist.exit_code == 0, dist.output
        assert json.loads(dist.stdout) == json.loads(plain.stdout)
    bad = runner.invoke(app, ["topk", local_url, "--query-set", "test", "--scheduler", "tcp://127.0.0.1:notaport"])
    assert bad.exit_code == 2 and "not a Dask scheduler address" in bad.output
