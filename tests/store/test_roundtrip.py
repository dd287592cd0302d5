from __future__ import annotations

import numpy as np

import daunce_store


def test_columns_read_back_bit_identical(small_store):
    store, train, query = small_store
    reopened = daunce_store.open(store.url, mode="r")
    assert reopened.num_columns() == train.shape[1]
    np.testing.assert_array_equal(reopened.train_losses(), train)
    np.testing.assert_array_equal(reopened.query_losses("test"), query)


def test_row_blocks_cover_every_row_once(small_store):
    store, train, _ = small_store
    blocks = list(store.iter_row_blocks(block_rows=50))
    assert [off for off, _ in blocks] == list(range(0, 300, 50))
    for off, block in blocks:
        assert block.dtype == np.float32 and block.flags.c_contiguous
        np.testing.assert_array_equal(block, train[off : off + 50])


def test_topk_matches_dense_covariance(small_store):
    store, train, query = small_store
    result = store.topk("test", k=5, measure="cov")
    full = np.cov(np.vstack([train, query]))[: len(train), len(train) :]
    for j in range(query.shape[0]):
        want = np.argsort(-full[:, j], kind="stable")[:5]
        np.testing.assert_array_equal(result.indices["pos"][j], want)
        np.testing.assert_allclose(result.scores["pos"][j], full[want, j], rtol=1e-4, atol=1e-5)
