"""Bad input gets a clear DaunceStoreError and leaves the store exactly as it was (bit for bit).

Every test runs on each backend (local directory, S3 over loopback) through the ``location`` fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr

import daunce_store
from _support import Location, column, fill
from daunce_store import errors

N, M = 40, 3


def _store(location: Location, k: int = 3) -> daunce_store.LossStore:
    store = location.init("s.zarr", [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=16)
    fill(store, range(k))
    return store


def _refused(
    location: Location, call: Callable[[], Any], error: type[Exception], match: str, name: str = "s.zarr"
) -> None:
    """``call`` raises ``error`` whose message matches ``match``, and nothing under ``name`` changed."""
    before = location.objects(name)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, errors.DaunceStoreError)
    assert location.objects(name) == before


# --- loss vectors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_train_losses_refused(location: Location, bad: float) -> None:
    store = _store(location)
    values = column(9, N)
    values[7] = bad
    _refused(location, lambda: store.append("p9", values), errors.DivergedError, r"1 losses are NaN, inf or beyond ±1e\+15 \(.*first at rows \[7\]\)")
    assert store.num_columns() == 3


def test_non_finite_query_losses_refused(location: Location) -> None:
    store = _store(location)
    q = column(9, M)
    q[0] = np.nan
    _refused(location, lambda: store.append("p9", column(9, N), {"test": q}), errors.InvalidInputError, "query set 'test'")


def test_float64_overflowing_float32_refused(location: Location) -> None:
    store = _store(location)
    values = column(9, N).astype(np.float64)
    values[3] = 1e300
    _refused(location, lambda: store.append("p9", values), errors.DivergedError, r"max \|loss\| 1e\+300")


# A diverged fine-tune's losses (1e20 was seen): finite float32, but their float32 scores overflow (cov printed
# "Infinity", the Gram of the default measure turned inf). Every append path refuses them, naming the
# perturbation and the largest |loss|, and says what to do.
@pytest.mark.parametrize("size", [1e20, -1e20, 3e38, 1.01e15], ids=["1e20", "-1e20", "3e38", "just-over"])
def test_exploding_train_losses_refused(location: Location, size: float) -> None:
    store = _store(location)
    values = column(9, N)
    values[[4, 11]] = np.float32(size)
    _refused(location, lambda: store.append("p9", values), errors.DivergedError,
             r"train losses of 'p9': 2 losses are NaN, inf or beyond ±1e\+15 \(max \|loss\| .*first at rows \[4, 11\]\)")
    with pytest.raises(errors.DivergedError) as info:
        store.append("p9", values)
    message = str(info.value)
    assert f"max |loss| {abs(float(np.float32(size))):.3g}" in message
    assert "diverged" in message and "lower learning rate" in message
    assert store.num_columns() == 3


def test_losses_at_the_bound_are_kept(location: Location) -> None:
    """|loss| up to MAX_ABS_LOSS is a column like any other, and scores finitely under every measure."""
    from daunce_store._constants import MAX_ABS_LOSS

    store = _store(location)
    values = column(9, N)
    values[[0, 5]] = [MAX_ABS_LOSS, -MAX_ABS_LOSS]
    store.append("p9", values, {"test": np.array([MAX_ABS_LOSS, 0.5, -MAX_ABS_LOSS], np.float32)})
    assert store.num_columns() == 4
    for measure in ("cov", "corr", "auto", "whitened"):
        result = store.topk("test", k=3, measure=measure)
        for side in result.scores:
            assert np.isfinite(result.scores[side]).all(), (measure, side, result.scores[side])
    assert np.isfinite(store.self_influence(k=3, measure="cov").scores["pos"]).all()


def test_exploding_query_losses_refused(location: Location) -> None:
    store = _store(location)
    q = column(9, M)
    q[1] = 5e16
    _refused(location, lambda: store.append("p9", column(9, N), {"test": q}), errors.DivergedError,
             r"query set 'test' losses of 'p9': 1 losses .*max \|loss\| 5e\+16")
    store.add_query_set("later", ["x", "y"])
    _refused(location, lambda: store.append_query_losses("p1", "later", np.array([1.0, -2e15])), errors.DivergedError,
             r"query set 'later' losses of 'p1'.*max \|loss\| 2e\+15.*lower learning rate")


@pytest.mark.parametrize("length", [0, N - 1, N + 1])
def test_wrong_length_refused(location: Location, length: int) -> None:
    store = _store(location)
    _refused(location, lambda: store.append("p9", np.zeros(length, np.float32)), errors.InvalidInputError, f"expected {N} losses")


def test_wrong_query_length_refused(location: Location) -> None:
    store = _store(location)
    _refused(
        location, lambda: store.append("p9", column(9, N), {"test": np.zeros(M + 1)}), errors.InvalidInputError, f"expected {M} losses"
    )


def test_two_column_matrix_refused(location: Location) -> None:
    store = _store(location)
    _refused(location, lambda: store.append("p9", np.zeros((N, 2))), errors.InvalidInputError, "one per example")


@pytest.mark.parametrize(
    "values",
    [
        np.array([str(x) for x in range(N)]),  # strings, even numeric-looking ones
        np.array([1.0] * N, dtype=object),  # object arrays
        np.array([None] * N),
        np.ones(N, dtype=bool),
        np.ones(N, dtype=np.complex64),
    ],
    ids=["str", "object", "none", "bool", "complex"],
)
def test_wrong_dtype_refused(location: Location, values: np.ndarray) -> None:
    store = _store(location)
    _refused(location, lambda: store.append("p9", values), errors.InvalidInputError, "losses must be numbers")


# --- ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, match",
    [
        (["a", "b", "a"], "duplicate ids"),
        ([1, 2, 2], "duplicate ids"),
        ([], "non-empty"),
        (["a", "", "c"], "empty"),
        (["a", "  ", "c"], "empty"),
        (["a", None, "c"], "missing"),
        (np.array(["a", np.nan], dtype=object), "missing"),
        (np.array([1.0, 2.0]), "strings or integers"),
        (np.array([["a", "b"]]), "1-d"),
    ],
    ids=["dup-str", "dup-int", "none-at-all", "empty-string", "blank", "None", "NaN", "float", "2-d"],
)
def test_bad_train_ids_create_nothing(location: Location, ids: Any, match: str) -> None:
    _refused(location, lambda: location.init("s.zarr", ids), errors.InvalidInputError, match)
    assert location.objects("s.zarr") == {}


def test_bad_query_ids_refused(location: Location) -> None:
    store = _store(location)
    _refused(location, lambda: store.add_query_set("other", ["x", "y", "x"]), errors.InvalidInputError, "duplicate ids")
    _refused(location, lambda: store.add_query_set("other", []), errors.InvalidInputError, "non-empty")
    assert "other" not in store.query_sets()


@pytest.mark.parametrize("name", ["has space", "a/b", "../up", "1st", "", "dash-ed", "naïve", "x.y"])
def test_query_set_name_not_an_identifier(location: Location, name: str) -> None:
    store = _store(location)
    _refused(location, lambda: store.add_query_set(name, ["x"]), errors.InvalidInputError, "not a plain identifier")
    _refused(
        location, lambda: location.init("t.zarr", ["a"], {name: ["x"]}), errors.InvalidInputError, "not a plain identifier", "t.zarr"
    )
    assert location.objects("t.zarr") == {}


def test_query_set_name_taken(location: Location) -> None:
    store = _store(location)
    _refused(location, lambda: store.add_query_set("test", ["x"]), errors.InvalidInputError, "already exists")


@pytest.mark.parametrize("pid", ["", "a/b", "..", ".hidden", "has space"])
def test_bad_perturbation_id(location: Location, pid: str) -> None:
    store = _store(location)
    _refused(location, lambda: store.append(pid, column(9, N)), errors.InvalidInputError, "perturbation id")


# --- unknown names --------------------------------------------------------------------------------
def test_unknown_query_set(location: Location) -> None:
    store = _store(location)
    _refused(
        location, lambda: store.append("p9", column(9, N), {"tset": column(9, M)}), errors.UnknownQuerySetError, "unknown query set 'tset'.*has: test"
    )
    _refused(location, lambda: store.topk("tset", k=2), errors.UnknownQuerySetError, "unknown query set 'tset'")
    _refused(location, lambda: store.query_losses("tset"), errors.UnknownQuerySetError, "add-queries")


def test_unknown_query_id(location: Location) -> None:
    store = _store(location)
    _refused(location, lambda: store.topk("test", ["q0", "q99"], k=2), errors.UnknownIdError, "'q99' is not in the query set 'test'")
    _refused(location, lambda: store.train_index(["t0", "nope"]), errors.UnknownIdError, "'nope' is not in the train set")


# --- scoring arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("k, match", [(0, ">= 1"), (-3, ">= 1"), (N + 1, f"larger than the training set \\(n={N}\\)")])
def test_k_out_of_range(location: Location, k: int, match: str) -> None:
    store = _store(location)
    _refused(location, lambda: store.topk("test", k=k), errors.InvalidInputError, match)
    _refused(location, lambda: store.self_influence(k=k), errors.InvalidInputError, match)
    _refused(location, lambda: store.influence("test", k=k), errors.InvalidInputError, match)


@pytest.mark.parametrize("k_columns", [0, 1])
def test_fewer_than_two_columns(location: Location, k_columns: int) -> None:
    store = _store(location, k=k_columns)
    _refused(location, lambda: store.topk("test", k=2), errors.NotEnoughColumnsError, f"at least 2 .* has {k_columns}")
    _refused(location, lambda: store.self_influence(k=2), errors.NotEnoughColumnsError, "at least 2")


def test_columns_without_query_losses_do_not_count(location: Location) -> None:
    store = _store(location, k=1)
    store.append("p_train_only", column(5, N))  # no losses for 'test'
    assert store.num_columns() == 2
    _refused(location, lambda: store.topk("test", k=2), errors.NotEnoughColumnsError, "query set 'test'.* has 1")


# --- writes that must not repeat --------------------------------------------------------------------
def test_same_perturbation_twice(location: Location) -> None:
    store = _store(location)
    _refused(location, lambda: store.append("p1", column(1, N)), errors.AlreadyCommittedError, "'p1' is already committed")
    # Also with different data, and from a second handle on the same store.
    other = location.open()
    _refused(location, lambda: other.append("p2", column(77, N)), errors.AlreadyCommittedError, "already committed")
    np.testing.assert_array_equal(store.train_losses()[:, 2], column(2, N))


def test_read_only_handle_refuses_writes(location: Location) -> None:
    _store(location)
    ro = location.open(mode="r")
    _refused(location, lambda: ro.append("p9", column(9, N)), errors.InvalidInputError, "read-only")
    _refused(location, lambda: ro.add_query_set("more", ["x"]), errors.InvalidInputError, "read-only")
    _refused(location, lambda: ro.claim("p9"), errors.InvalidInputError, "read-only")


def test_init_over_existing_store(location: Location) -> None:
    _store(location)
    _refused(location, lambda: location.init("s.zarr", ["a", "b"]), errors.StoreExistsError, "already holds data")


# --- things that are not (readable) daunce stores -----------------------------------------------------
def test_nothing_there(location: Location) -> None:
    with pytest.raises(errors.NotADaunceStoreError, match="nothing there"):
        location.open("missing.zarr")
    assert location.objects("missing.zarr") == {}


def test_foreign_zarr_group(location: Location) -> None:
    root = zarr.open_group(_zarr_store(location, "foreign.zarr"), mode="w")
    root.create_array("x", shape=(4,), dtype="f4")[:] = 1
    _refused(location, lambda: location.open("foreign.zarr"), errors.NotADaunceStoreError, "not a daunce store", "foreign.zarr")
    _refused(location, lambda: location.init("foreign.zarr", ["a"]), errors.StoreExistsError, "already holds data", "foreign.zarr")


def test_foreign_zarr_array_at_root(location: Location) -> None:
    zarr.create_array(_zarr_store(location, "arr.zarr"), shape=(4,), dtype="f4")
    _refused(location, lambda: location.open("arr.zarr"), errors.NotADaunceStoreError, "not a daunce store", "arr.zarr")


def test_unrelated_files(location: Location) -> None:
    _put(location, "junk/readme.txt", b"hello")
    _refused(location, lambda: location.open("junk"), errors.NotADaunceStoreError, "not a daunce store", "junk")


def test_newer_format_version(location: Location) -> None:
    _store(location)
    root = zarr.open_group(_zarr_store(location, "s.zarr"), mode="r+")
    root.attrs["daunce_store"] = {**root.attrs["daunce_store"], "format_version": 99}
    _refused(location, lambda: location.open(), errors.StoreVersionError, "format version 99, newer")


def test_local_plain_file(tmp_path) -> None:
    path = tmp_path / "losses.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(errors.NotADaunceStoreError, match="is a file"):
        daunce_store.open(path)
    with pytest.raises(errors.StoreExistsError, match="is a file"):
        daunce_store.init(path, ["a"])
    assert np.load(path).tolist() == [0, 0, 0]


def test_local_empty_directory(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.NotADaunceStoreError, match="nothing there"):
        daunce_store.open(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    # An empty directory is a fine place for a new store.
    assert daunce_store.init(tmp_path / "empty", ["a", "b"]).n_train == 2


def _zarr_store(location: Location, name: str) -> Any:
    from daunce_store.store import Storage

    return Storage(location.url(name), location.options).zarr_store


def _put(location: Location, key: str, data: bytes) -> None:
    import obstore

    from daunce_store.store import Storage

    head, _, tail = key.partition("/")
    obstore.put(Storage(location.url(head), location.options)._log_store(), tail, data)
