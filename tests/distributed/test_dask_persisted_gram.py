"""Dask and the persisted K × K matrices: a driver on a writable handle persists the matrix its cluster
summed (the bits of the single-process pass), and a driver that finds one runs no Gram pass at all."""

from __future__ import annotations

import numpy as np
import pytest

import daunce_store
from daunce_store import _constants as C
from daunce_store.scoring import _distributed
from daunce_store.scoring._measures import gram_for

from test_dask_scoring import CHUNK, _build, _same

pytestmark = pytest.mark.dask


@pytest.fixture
def gram_passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the Gram passes the Dask driver runs on the cluster (the real ``DaskExecutor.gram_pass``, wrapped)."""
    seen: list[str] = []
    real = _distributed.DaskExecutor.gram_pass

    def counted(run, kind):
        seen.append(kind)
        return real(run, kind)

    monkeypatch.setattr(_distributed.DaskExecutor, "gram_pass", counted)
    return seen


def test_the_cluster_pass_is_persisted_and_reused(cluster, tmp_path, gram_passes):
    url = str(tmp_path / "s.zarr")
    _build(url)
    want = daunce_store.open(url, "r").topk("test", k=7, measure="nystrom", block_rows=CHUNK)
    got = daunce_store.open(url).topk("test", k=7, measure="nystrom", block_rows=CHUNK, client=cluster, partition_rows=300)
    _same(got, want)
    assert gram_passes == ["nystrom"]
    (record,) = (tmp_path / "s.zarr" / C.MATRICES_PREFIX).rglob("*.json")
    fresh = daunce_store.open(url, "r")
    persisted = gram_for(fresh, fresh.snapshot(), fresh.committed_slots(), "nystrom", CHUNK)  # read from the record
    assert persisted.matrix.tobytes() == _one_pass(url).matrix.tobytes()  # the cluster's sum has the pass's bits
    # A read-only driver that finds the record runs no pass, and answers the same.
    for measure in ("nystrom", "nystrom-corr", "auto"):
        _same(daunce_store.open(url, "r").topk("test", k=7, measure=measure, block_rows=CHUNK, client=cluster, partition_rows=300),
              daunce_store.open(url, "r").topk("test", k=7, measure=measure, block_rows=CHUNK))
    _same(daunce_store.open(url, "r").self_influence(k=5, measure="nystrom", client=cluster, partition_rows=300),
          daunce_store.open(url, "r").self_influence(k=5, measure="nystrom"))
    assert gram_passes == ["nystrom"]
    assert record.exists()


def _one_pass(url: str):
    """The Gram of one single-process pass (no record, no cache)."""
    from daunce_store.scoring._measures import Gram, column_names, draws_of

    store = daunce_store.open(url, "r")
    snap = store.snapshot()
    slots = store.committed_slots(snapshot=snap)
    return Gram.accumulate("nystrom", store.iter_row_blocks(snapshot=snap, slots=slots, block_rows=CHUNK), draws_of(snap, slots),
                           column_names(snap, slots))
