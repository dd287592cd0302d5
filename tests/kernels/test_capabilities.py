"""Accumulators declare what they take (``takes_transform``, ``takes_row_scales``, ``takes_chunks``), and the
scan asks them: a declared step works, an undeclared one is refused, and a backend that does not read chunk
files never gets the store's fused pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from daunce_store.scoring._accumulator import Accumulator
from daunce_store.scoring._backend import accumulator_class, make_accumulator

from _stores import build_store, make_losses


def test_declared_steps_work_and_the_others_are_refused(backend: str):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    cls = accumulator_class(backend)
    acc = make_accumulator(x[:2], 3, "cov", ("pos",), backend)
    assert isinstance(acc, cls) and isinstance(acc, Accumulator)
    steps = {
        "takes_transform": lambda: acc.set_transform(np.eye(6, dtype=np.float32)),
        "takes_row_scales": lambda: acc.set_row_scales(np.ones(40, np.float32)),
    }
    for flag, step in steps.items():
        if getattr(cls, flag):
            step()
        else:
            with pytest.raises(NotImplementedError, match="does not take"):
                step()
    if not cls.takes_chunks:
        with pytest.raises(NotImplementedError, match="does not read chunk files"):
            acc.push_chunks("/nowhere", [], 0, 1)
    acc.push_block(0, x)
    assert acc.finish()["pos"][0].shape == (2, 3)


def test_the_fused_pass_goes_only_to_accumulators_that_read_chunks(tmp_path, monkeypatch, backend: str):
    """The store's fused pass is offered (``scan_fused`` called) exactly when the backend declares
    ``takes_chunks``; the answer is the same either way."""
    from daunce_store.store._loss_store import LossStore

    train, query = make_losses(200, 4, 8)
    store = build_store(tmp_path / "s.zarr", train, query)
    offered: list[bool] = []
    real = LossStore.scan_fused

    def spy(self: Any, *args: Any, **kwargs: Any) -> bool:
        offered.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LossStore, "scan_fused", spy)
    got = store.topk("test", k=5, measure="cov", backend=backend)
    assert bool(offered) == accumulator_class(backend).takes_chunks
    want = store.topk("test", k=5, measure="cov", backend="numpy")
    np.testing.assert_array_equal(got.indices["pos"], want.indices["pos"])
