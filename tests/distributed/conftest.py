"""A local Dask cluster of two worker processes (one per test module) and an S3-compatible server on
loopback, for the distributed scoring tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

BUCKET = "daunce-dask-test"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` and a client of it."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as lc, distributed.Client(lc) as client:
        yield client


@pytest.fixture(scope="module")
def s3_location() -> Iterator[tuple[str, dict[str, Any]]]:
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket; yields (``s3://bucket``, obstore
    storage_options), as tests/store/conftest.py's ``s3_endpoint`` (pytest does not share it across folders)."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}", {
        "endpoint": endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        "region": "us-east-1",
        "client_options": {"allow_http": True},
    }
    server.stop()
