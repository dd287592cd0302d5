"""Names that used to collide silently: a query set called ``train`` (the ``set`` label of train rows in
exports), perturbation ids ``3`` and ``000003`` (two columns for one perturbation), names too long for a
file system. Each is now refused or made one, with the store left as it was."""

from __future__ import annotations

import numpy as np
import pytest

import daunce_store
from daunce_store import errors
from daunce_store.store import perturbation_id


@pytest.fixture
def store(tmp_path):
    return daunce_store.init(tmp_path / "s.zarr", ["a", "b", "c"], {"test": ["q"]})


def _col(seed=0):
    return np.random.default_rng(seed).random(3)


@pytest.mark.parametrize("spelling", [3, "3", "03", "000003"])
def test_numeric_perturbation_ids_are_one_id(store, spelling):
    commit = store.append(spelling, _col(), {"test": [0.5]})
    assert commit.perturbation == perturbation_id(3) == "000003"
    for other in (3, "3", "0003", "000003"):
        assert store.is_committed(other)
        with pytest.raises(errors.AlreadyCommittedError):
            store.append(other, _col(1))
    assert store.num_columns() == 1


def test_non_numeric_ids_are_kept_as_written(store):
    assert store.append("p03", _col()).perturbation == "p03"
    assert not store.is_committed("p3")


def test_query_set_named_train_is_reserved(store, tmp_path):
    with pytest.raises(errors.InvalidInputError, match="'train' is reserved"):
        store.add_query_set("train", ["x"])
    with pytest.raises(errors.InvalidInputError, match="reserved"):
        daunce_store.init(tmp_path / "t.zarr", ["a"], {"train": ["q"]})
    assert not (tmp_path / "t.zarr").exists()
    assert store.query_sets() == {"test": 1}


@pytest.mark.parametrize("what", ["perturbation", "query_set"])
def test_names_longer_than_a_file_name_allows(store, what):
    long = "x" * 300
    with pytest.raises(errors.InvalidInputError, match="300 characters; the limit is 200"):
        if what == "perturbation":
            store.append(long, _col())
        else:
            store.add_query_set(long, ["x"])
    assert store.num_columns() == 0 and store.query_sets() == {"test": 1}


@pytest.mark.parametrize("bad", [None, 3.0, True, b"p1", ["p"]])
def test_perturbation_id_of_wrong_type(store, bad):
    with pytest.raises(errors.InvalidInputError, match="must be a string or an int"):
        store.append(bad, _col())

