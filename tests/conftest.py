"""Shared fixtures: small real stores on disk, and an S3-compatible server on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import daunce_store
from _stores import build_store, make_losses


@pytest.fixture(scope="session", autouse=True)
def _daunce_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The derived-data cache (model copies, hidden states: perturb/_model_files.py) in a folder of this test
    session, never the user's ~/.cache; spawned workers inherit it through the environment."""
    import os

    old = os.environ.get("DAUNCE_CACHE_DIR")
    os.environ["DAUNCE_CACHE_DIR"] = str(tmp_path_factory.mktemp("daunce-cache"))
    yield
    if old is None:
        os.environ.pop("DAUNCE_CACHE_DIR", None)
    else:
        os.environ["DAUNCE_CACHE_DIR"] = old


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[daunce_store.LossStore, np.ndarray, np.ndarray]:
    train, query = make_losses(300, 7, 12)
    return build_store(tmp_path / "s.zarr", train, query), train, query


# One bucket for every test that needs an object store; each test works under its own random prefix.
S3_BUCKET = "daunce-test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 (a free port), with the bucket ``S3_BUCKET``; yields obstore storage_options."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket=S3_BUCKET)
    yield {
        "endpoint": endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        "region": "us-east-1",
        "client_options": {"allow_http": True},
    }
    server.stop()


def s3s_fs_binary() -> str | None:
    """The ``s3s-fs`` executable (``cargo install s3s-fs --version 0.14.1 --features binary --locked``, as
    .ci/run does), or None."""
    import shutil

    found = shutil.which("s3s-fs")
    cargo = Path.home() / ".cargo" / "bin" / "s3s-fs"
    return found or (str(cargo) if cargo.is_file() else None)


@pytest.fixture(scope="session")
def s3s_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real S3 server on 127.0.0.1 (a free port): ``s3s-fs`` serving a temporary directory, the bucket
    ``S3_BUCKET`` a folder of it, fixed access keys; yields obstore storage_options as ``s3_endpoint``."""
    import socket
    import subprocess
    import time

    binary = s3s_fs_binary()
    if binary is None:
        pytest.skip("s3s-fs is not installed: cargo install s3s-fs --version 0.14.1 --features binary --locked")
    root = tmp_path_factory.mktemp("s3s-fs")
    (root / S3_BUCKET).mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", "s3s-test", "--secret-key", "s3s-secret", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:  # ready once it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"s3s-fs did not start on port {port}: {proc.stderr.read().decode() if proc.stderr else ''}") from None
            time.sleep(0.05)
    yield {
        "endpoint": f"http://127.0.0.1:{port}",
        "access_key_id": "s3s-test",
        "secret_access_key": "s3s-secret",
        "region": "us-east-1",
        "client_options": {"allow_http": True},
    }
    proc.terminate()
    proc.wait(timeout=30)
