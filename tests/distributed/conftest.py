"""A local Dask cluster of two worker processes (one per test module), and a place on the S3 server of
tests/conftest.py, for the distributed scoring tests."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` and a client of it."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as lc, distributed.Client(lc) as client:
        yield client


@pytest.fixture
def s3_location(s3_endpoint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A fresh prefix in the bucket of tests/conftest.py's moto server: (``s3://bucket/prefix``, storage_options)."""
    return f"s3://daunce-test/{uuid.uuid4().hex}", s3_endpoint
