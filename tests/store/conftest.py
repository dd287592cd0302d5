"""Store locations for the shared store tests: a local directory and an S3 bucket served by moto on
loopback (``s3_endpoint`` in tests/conftest.py). Tests that take ``location`` run once per backend
(zarr-python's "one test base, every store" habit), so both backends must raise the same errors and
keep the same guarantees."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from _support import BUCKET, Location


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """A fresh place for stores, on each backend."""
    if request.param == "local":
        return Location("local", str(tmp_path), None)
    options = request.getfixturevalue("s3_endpoint")
    return Location("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}", options)
