"""The perturbation draw: any row range regenerates the same values, the extension and the numpy
fallback give the same bits, and the draw round-trips through commit metadata."""

from __future__ import annotations

import numpy as np
import pytest

from daunce_store._constants import NO_EXT_ENV
from daunce_store._ext import extension
from daunce_store.errors import CorruptRecordError, InvalidInputError
from daunce_store.store import PerturbationDraw, weights_block


@pytest.mark.parametrize("objective", ["if", "fisher", "blackbox", "reweighted"])
def test_blocks_equal_the_whole(objective):
    d = PerturbationDraw(store_seed=5, k=17, ratio=0.3, objective=objective, rho=0.7, gamma=0.9)
    n = 10_000
    w, members = d.linear_weights(0, n)
    member = d.in_subset(0, n)
    assert members == member.sum()
    for r0, r1 in [(0, 1), (1, 4096), (4096, 5000), (9_999, 10_000), (123, 7777)]:
        wb, mb = d.linear_weights(r0, r1)
        np.testing.assert_array_equal(wb, w[r0:r1])
        assert mb == member[r0:r1].sum()
        np.testing.assert_array_equal(d.in_subset(r0, r1), member[r0:r1])
        np.testing.assert_array_equal(d.xi(r0, r1), d.xi(0, n)[r0:r1])
    np.testing.assert_array_equal(np.flatnonzero(member), d.subset(n))
    assert abs(member.mean() - 0.3) < 0.02  # Poisson sampling at the ratio
    c = d.c(0, n)
    expect = {"if": c - 0.9, "fisher": c, "blackbox": -np.ones(n), "reweighted": c - 0.9}[objective]
    np.testing.assert_array_equal(w, np.where(member, expect, 0.0))


def test_draws_differ_by_seed_and_perturbation():
    base = PerturbationDraw(0, 0, 0.5).xi(0, 1000)
    assert not np.array_equal(base, PerturbationDraw(0, 1, 0.5).xi(0, 1000))
    assert not np.array_equal(base, PerturbationDraw(1, 0, 0.5).xi(0, 1000))
    assert 0.0 <= base.min() and base.max() < 1.0 and abs(base.mean() - 0.5) < 0.05


def test_extension_and_numpy_fallback_give_the_same_bits(monkeypatch):
    if extension() is None:
        pytest.fail(f"the Rust extension is not built; run `maturin develop --release` (or set {NO_EXT_ENV}=1)")
    draws = [PerturbationDraw(s, k, r, obj) for s, k, r, obj in [(0, 0, 0.3, "if"), (9, 123456, 1.0, "fisher"), (2**40, 3, 0.01, "blackbox"),
                                                                 (4, 5, 1.0, "reweighted")]]
    fast = [(d.linear_weights(777, 300_777), d.xi(0, 10)) for d in draws]
    assert all(m > 0 for (_, m), _ in fast)
    monkeypatch.setenv(NO_EXT_ENV, "1")
    assert extension() is None
    for d, ((w, m), xi) in zip(draws, fast):
        w2, m2 = d.linear_weights(777, 300_777)
        np.testing.assert_array_equal(w, w2)
        assert m == m2
        np.testing.assert_array_equal(xi, d.xi(0, 10))


def test_weights_block_holds_every_column(monkeypatch):
    draws = [PerturbationDraw(3, k, r, obj, rho=0.8, gamma=0.9) for k, (r, obj) in enumerate([(0.3, "if"), (1.0, "fisher"), (0.5, "blackbox")] * 3)]
    block, members = weights_block(draws, 1000, 5000)
    assert block.shape == (4000, 9) and block.dtype == np.float32 and block.flags.c_contiguous
    for j, d in enumerate(draws):
        w, m = d.linear_weights(1000, 5000)
        np.testing.assert_array_equal(block[:, j], w.astype(np.float32))
        assert members[j] == m
    monkeypatch.setenv(NO_EXT_ENV, "1")
    slow, slow_members = weights_block(draws, 1000, 5000)
    np.testing.assert_array_equal(slow, block)
    np.testing.assert_array_equal(slow_members, members)


def test_metadata_round_trip_and_bad_records():
    d = PerturbationDraw(3, 8, 0.25, "fisher", rho=0.5)
    assert PerturbationDraw.from_metadata({"draw": d.to_metadata()}) == d
    assert PerturbationDraw.from_metadata({"objective": "blackbox"}) is None  # records no draw
    assert PerturbationDraw.from_metadata({"draw": {"scheme": "something-else"}}) is None
    with pytest.raises(CorruptRecordError, match="garbles"):
        PerturbationDraw.from_metadata({"draw": {"scheme": d.to_metadata()["scheme"], "k": 1}})
    with pytest.raises(InvalidInputError, match="ratio"):
        PerturbationDraw(0, 0, 1.5)
    with pytest.raises(InvalidInputError, match="objective"):
        PerturbationDraw(0, 0, 0.5, "sgd")
