"""The JSON API over a real uvicorn server on 127.0.0.1: the CLI's records, bad input as 4xx with a
message, new columns counted without a restart, rows served from memory, data files checked up front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import daunce_store
from daunce_store.cli import app as cli
from daunce_store.errors import CorruptChunkError, InvalidInputError, UnknownQuerySetError
from daunce_store.serve import ServedStore, create_app, load_data

from _serve_support import PNG, K, N, append_next, free_port, losses, make_store, write_data

LOCAL = "http://127.0.0.1"  # TestClient's default Host (testserver) is refused by the Host check


def same_records(api: list[dict[str, Any]], cli: list[dict[str, Any]]) -> None:
    """The same records, scores to float32 rounding: the CLI on a local store scores chunk segments as it
    reads them (the fused Rust path), the server scores the same rows from memory in blocks; the two sum in
    another order (the project's contract between paths: same indices, scores to float32 tolerance)."""
    assert [{**r, "score": None} for r in api] == [{**r, "score": None} for r in cli]
    assert [r["score"] for r in api] == pytest.approx([r["score"] for r in cli], rel=1e-5, abs=1e-9)


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("path", "params", "command"),
    [
        ("/api/topk", {"query_set": "test", "k": 7}, ["topk", "--query-set", "test", "-k", "7"]),
        ("/api/topk", {"query_set": "test", "query": ["q1", "q4"], "k": 5, "side": "neg", "measure": "corr"},
         ["topk", "--query-set", "test", "--query", "q1", "--query", "q4", "-k", "5", "--side", "neg", "--measure", "corr"]),
        ("/api/influence", {"query_set": "test", "k": 6, "measure": "cov"}, ["influence", "--query-set", "test", "-k", "6", "--measure", "cov"]),
        ("/api/self-influence", {"k": 9}, ["self-influence", "-k", "9"]),
    ],
)
def test_rankings_are_the_cli_records(server, served, path, params, command):
    """Each ranking endpoint answers with the envelope `daunce ... --format json` prints (same measure, K and records)."""
    body = httpx.get(server.url + path, params=params).raise_for_status().json()
    expected = cli_json(*command, served["url"], "--format", "json")
    assert set(body) == set(expected) == {"measure", "num_columns", "records"}
    assert body["measure"] == expected["measure"] and body["num_columns"] == expected["num_columns"] == K
    same_records(body["records"], expected["records"])
    assert len(expected["records"]) > 0


def test_default_measures_per_task(server, served):
    """The page's top-k lists default to the measure for reading (auto-corr), curation endpoints to auto."""
    info = httpx.get(server.url + "/api/info").raise_for_status().json()
    assert info["topk_measure"] == "auto-corr" and info["default_measure"] == "auto"
    top = httpx.get(server.url + "/api/topk", params={"query_set": "test", "k": 2}).raise_for_status().json()
    agg = httpx.get(server.url + "/api/influence", params={"query_set": "test", "k": 2}).raise_for_status().json()
    assert top["measure"] in ("nystrom-corr", "whitened-corr") and agg["measure"] in ("nystrom", "whitened")
    assert top["measure"] == agg["measure"] + "-corr"  # the same choice (draws or not), normalised


def test_stability_and_status_are_the_cli_json(server, served):
    body = httpx.get(server.url + "/api/stability", params={"query_set": "test", "query": ["q2"], "k": 4, "bootstrap": 6},
                     timeout=30).raise_for_status().json()
    expected = cli_json("stability", served["url"], "--query-set", "test", "--query", "q2", "-k", "4", "--bootstrap", "6", "--format", "json")
    assert {k: body[k] for k in ("summary", "records", "asymmetry", "negative_share", "drift_share", "l2_center")} == expected  # json.dumps both: exact
    assert len(expected["records"]) == 2 * 4
    status = httpx.get(server.url + "/api/status").raise_for_status().json()
    assert status == cli_json("status", served["url"], "--format", "json")


@pytest.mark.parametrize(
    ("path", "params", "code", "message"),
    [
        ("/api/topk", {"query_set": "nope"}, 404, "unknown query set 'nope'"),
        ("/api/topk", {"query_set": "test", "query": ["q1", "zz"]}, 404, "id 'zz' is not in the query set 'test'"),
        ("/api/topk", {"query_set": "test", "k": 0}, 400, "k must be a whole number >= 1, not 0"),
        ("/api/topk", {"query_set": "test", "k": -3}, 400, "k must be a whole number >= 1"),
        ("/api/topk", {"query_set": "test", "k": N + 1}, 400, f"k={N + 1} is larger than the training set (n={N})"),
        ("/api/topk", {"query_set": "test", "k": "ten"}, 422, "k: Input should be a valid integer"),
        ("/api/topk", {}, 422, "query_set: Field required"),
        ("/api/topk", {"query_set": "test", "measure": "cosine"}, 400, "cosine"),
        ("/api/topk", {"query_set": "test", "side": "up"}, 400, "side must be pos, neg or both"),
        ("/api/influence", {"query_set": "test", "k": N + 5}, 400, "is larger than the training set"),
        ("/api/stability", {"query_set": "nope"}, 404, "unknown query set 'nope'"),
        ("/api/stability", {"query_set": "test", "bootstrap": -1}, 400, "bootstrap must be a whole number"),
        ("/api/self-influence", {"k": 0}, 400, "k must be a whole number >= 1"),
        ("/api/self-influence", {"measure": "nystrom-corr"}, 400, "is 1 for every example"),
        ("/api/queries", {"query_set": "nope"}, 404, "unknown query set 'nope'"),
        ("/api/examples", {"set": "test", "id": ["q1"]}, 404, "no data file for 'test'"),
        ("/api/image", {"id": "t1", "column": "text"}, 400, "does not hold image file paths"),
        ("/api/examples", {"id": ["t1"] * 10_001}, 400, "10001 ids in one request is over this server's cap of 10000"),
    ],
)
def test_bad_input_is_a_4xx_with_one_line(served, path, params, code, message):
    from fastapi.testclient import TestClient

    store = ServedStore.open_served(served["url"])
    client = TestClient(create_app(store, load_data(store, [str(served["data"])])), base_url=LOCAL)
    response = client.get(path, params=params)
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error


def test_new_columns_count_from_the_next_request(server, served):
    """Incremental attribution: a column committed while the server runs shows in the next answer, and the
    answer equals a fresh handle's on the new snapshot (the in-memory rows were reloaded)."""
    params = {"query_set": "test", "k": 5}
    before = httpx.get(server.url + "/api/topk", params=params).raise_for_status().json()
    assert before["num_columns"] == K
    append_next(served)
    after = httpx.get(server.url + "/api/topk", params=params).raise_for_status().json()
    assert after["num_columns"] == K + 1
    same_records(after["records"], daunce_store.open(served["url"], "r").topk("test", k=5).records())
    assert after["records"] != before["records"]
    info = httpx.get(server.url + "/api/info").json()
    assert info["columns"] == K + 1 and info["rows"] == {**info["rows"], "cached": True, "columns": K + 1}


def test_scans_read_memory_not_the_store(tmp_path):
    """With the rows cached, scoring still answers after the store's train chunks are gone (it reads memory),
    for all columns and for a query set that has only some of them; without the cache the same request
    reads the store and fails naming the damage."""
    train, query = losses(N, 4, K)
    url = make_store(tmp_path / "s.zarr", train, query)
    plain = daunce_store.open(url, "r")
    late = plain.query_ids("test")[:3]
    writer = daunce_store.open(url)
    writer.add_query_set("late", list(late))
    for c in range(0, K, 2):  # losses for every other column only: the scan takes a column subset
        writer.append_query_losses(f"p{c}", "late", query[:3, c])
    expected = {name: plain.topk(name, k=6, measure="cov").records() for name in ("test", "late")}
    expected_self = plain.self_influence(k=6, measure="cov").records()

    served = ServedStore.open_served(url)
    cold = ServedStore.open_served(url, cache_bytes=0)
    assert served.rows_info["cached"] and not cold.rows_info["cached"]
    chunks = tmp_path / "s.zarr" / "train" / "losses" / "c"
    assert chunks.is_dir()
    shutil.rmtree(chunks)
    for name in ("test", "late"):
        snap = served.current()
        assert served.topk(name, k=6, measure="cov", snapshot=snap).records() == expected[name]
    assert served.self_influence(k=6, measure="cov", snapshot=served.current()).records() == expected_self
    with pytest.raises(CorruptChunkError):
        cold.topk("test", k=6, measure="cov", snapshot=cold.current())


def test_cached_blocks_are_read_only(served):
    store = ServedStore.open_served(served["url"])
    offset, block = next(iter(store.rows(store.current()).blocks()))
    with pytest.raises(ValueError, match="read-only"):  # a consumer writing into shared rows fails loudly
        block[0, 0] = 1.0


def test_data_files_are_checked_before_serving(served, tmp_path):
    store = ServedStore.open_served(served["url"])
    assert load_data(store, [str(served["data"])])["train"].matched == N
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text,label\nhello,1\nworld,0\n")  # no id column: rows 0, 1 are not train ids t0, t1
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "t1", "text": "a"}\n{"id": "t1", "text": "b"}\n')
    cases = [
        ([str(wrong)], InvalidInputError, "none of its row numbers (it has no `id` column)"),
        ([str(dup)], InvalidInputError, "duplicate id 't1' in rows 0 and 1"),
        ([str(tmp_path / "missing.jsonl")], InvalidInputError, "does not exist"),
        ([str(tmp_path / "train.txt")], InvalidInputError, "unknown extension"),
        ([f"nope={served['data']}"], UnknownQuerySetError, "unknown query set 'nope'"),
        ([str(served["data"]), str(served["data"])], InvalidInputError, "two files for 'train'"),
        ([f"test={served['data']}"], InvalidInputError, "of the store's query set 'test'"),
    ]
    (tmp_path / "train.txt").write_text("x")
    for specs, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_data(store, specs)


def test_example_content(served):
    """Texts come back as the exact strings (the page escapes them), pixels with their shape and the
    file's range, labels apart, unknown ids as null."""
    store = ServedStore.open_served(served["url"])
    data = load_data(store, [str(served["data"])])["train"]
    out = data.content(["t3", "missing"])
    assert out["missing"] is None
    fields = {f["name"]: f for f in out["t3"]["fields"]}
    assert fields["text"] == {"name": "text", "kind": "text", "value": write_data.__globals__["XSS"]}
    assert fields["pixels"]["kind"] == "pixels"
    assert {k: fields["pixels"]["value"][k] for k in ("height", "width", "channels", "min", "max")} == \
        {"height": 4, "width": 4, "channels": 1, "min": 0.0, "max": 15.0}
    assert out["t3"]["label"] == 0 and data.label_column == "label"
    assert set(fields) == {"text", "pixels"}  # the label is the label, not a field too (the page showed it twice)


def test_cli_serve_binds_loopback_and_answers(served):
    """`daunce serve` as a real process: it serves the page and the API on 127.0.0.1 (the default host)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "daunce_store.cli", "serve", served["url"], "--data", str(served["data"]),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).raise_for_status().json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "daunce serve did not answer within 60 s"
                time.sleep(0.2)
        assert info["columns"] == K and info["data"]["train"]["ids_with_data"] == N
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert '<script src="/static/app.js">' in page
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert f"serving on http://127.0.0.1:{port}/" in err


def test_cli_serve_bad_data_is_one_line(served, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    result = CliRunner().invoke(cli, ["serve", served["url"], "--data", str(bad), "--port", str(free_port())])
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # one message, wrapped by the terminal width
    assert message.startswith("error: data file") and message.count("error:") == 1
    assert "none of its row numbers (it has no `id` column) ('0', ...) is an id of the store's train ids ('t0', ...)" in message


def test_rows_are_the_stores(served):
    """The rows in memory are the store's rows, bit for bit."""
    store = ServedStore.open_served(served["url"])
    snap = store.current()
    got = np.concatenate([b for _, b in store.rows(snap).blocks()])
    assert np.array_equal(got, daunce_store.open(served["url"], "r").train_losses(snapshot=snap))


def test_concurrent_requests_share_one_scan(served):
    """Requests queued while a scan runs are answered by one scan together, each with its own queries'
    records: the same top-k as a lone request, scores to float32 rounding."""
    from concurrent.futures import ThreadPoolExecutor

    from daunce_store.serve._batch import TopkBatcher

    store = ServedStore.open_served(served["url"])
    batcher = TopkBatcher(store)
    asks = [["q0"], ["q1", "q3"], ["q2"], ["q3"], ["q4", "q0"], ["q1"]]
    with ThreadPoolExecutor(len(asks)) as pool:
        def queued(n: int) -> None:
            deadline = time.monotonic() + 20
            while batcher._queue.qsize() != n:
                assert time.monotonic() < deadline, "requests did not queue"
                time.sleep(0.01)

        with store._lock:  # the worker takes the first request and waits for the lock; the others queue
            futures = [pool.submit(batcher.topk, "test", asks[0], k=4, measure="whitened", side="both")]
            time.sleep(0.2)
            queued(0)
            futures += [pool.submit(batcher.topk, "test", q, k=4, measure="whitened", side="both") for q in asks[1:]]
            queued(len(asks) - 1)
        answers = [f.result(timeout=60) for f in futures]
    assert batcher.scans == 2  # the first request, then the other five together
    plain = daunce_store.open(served["url"], "r")
    for queries, answer in zip(asks, answers):
        expected = plain.topk("test", queries, k=4, measure="whitened").records()
        assert [{**r, "score": None} for r in answer["records"]] == [{**r, "score": None} for r in expected]
        assert [r["score"] for r in answer["records"]] == pytest.approx([r["score"] for r in expected], rel=1e-5)
        assert answer["num_columns"] == K and answer["measure"] == "whitened"


def test_concurrent_requests_over_http(server, served):
    """Many clients at once against the real server: every answer is its own query's top-k."""
    from concurrent.futures import ThreadPoolExecutor

    plain = daunce_store.open(served["url"], "r")
    expected = {q: plain.topk("test", [q], k=5).records() for q in plain.query_ids("test")}

    def ask(i: int) -> tuple[str, list[dict[str, Any]]]:
        q = f"q{i % 5}"
        return q, httpx.get(server.url + "/api/topk", params={"query_set": "test", "query": q, "k": 5}, timeout=60).raise_for_status().json()["records"]

    with ThreadPoolExecutor(16) as pool:
        for q, records in pool.map(ask, range(40)):
            assert [r["train_id"] for r in records] == [r["train_id"] for r in expected[q]]
            assert [r["score"] for r in records] == pytest.approx([r["score"] for r in expected[q]], rel=1e-5)




def test_images_by_path_and_data_uri(served, tmp_path):
    """A column of image file paths (relative to the data file) is served by /api/image; a column of
    data:image/png;base64 strings is passed through; anything else in them is not an image."""
    import base64

    import pandas as pd
    from fastapi.testclient import TestClient

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    data = tmp_path / "pictures.csv"
    pd.DataFrame({"id": ["t0", "t1", "t2"], "picture": ["img/a.png"] * 3,
                  "inline": [uri, uri, "javascript:alert(1)"]}).to_csv(data, index=False)
    store = ServedStore.open_served(served["url"])
    examples = load_data(store, [str(data)])
    assert examples["train"].kinds == {"picture": "image-file", "inline": "image"}
    client = TestClient(create_app(store, examples), base_url=LOCAL)
    got = client.get("/api/examples", params={"id": ["t1", "t2"]}).json()["examples"]
    assert {f["name"]: f["value"] for f in got["t1"]["fields"]} == {"picture": "img/a.png", "inline": uri}  # servable: named
    assert {f["name"]: f["value"] for f in got["t2"]["fields"]}["inline"] is None  # not a data:image URI: dropped
    image = client.get("/api/image", params={"id": "t1", "column": "picture"})
    assert image.status_code == 200 and image.content == PNG and image.headers["content-type"] == "image/png"
    missing = client.get("/api/image", params={"id": "t99", "column": "picture"})
    assert missing.status_code == 404 and "has no row" in missing.json()["error"]


def test_extreme_values_are_strict_json_or_a_4xx(served, tmp_path):
    """A column of a diverged fine-tune (|loss| 1e20, written past the append check): every answer is strict
    JSON; a ranking that would hold an inf score is a 400 naming the problem, never a null or `Infinity`
    score. Without bootstrap resamples the stability figures are null, as the CLI writes them."""
    import zarr
    from fastapi.testclient import TestClient

    slot = {c.perturbation: c.slot for c in daunce_store.open(served["url"]).commits()}["p2"]
    group = zarr.open_group(served["url"])
    for name, size in (("train/losses", N), ("queries/test/losses", 5)):
        group[name][:, slot] = np.where(np.arange(size) % 2 == 0, 1e20, -1e20).astype(np.float32)
    store = ServedStore.open_served(served["url"])
    client = TestClient(create_app(store, load_data(store, [str(served["data"])])), base_url=LOCAL)

    def strict(response):
        return json.loads(response.text, parse_constant=lambda token: pytest.fail(f"{token} in {response.text[:200]}"))

    for params, message in (({"measure": "cov"}, "overflow float32"), ({}, "'p2' hold losses up to |loss| 1e+20")):
        response = client.get("/api/topk", params={"query_set": "test", "k": 3, **params})
        assert response.status_code == 400, response.text
        assert message in strict(response)["error"]
    body = strict(client.get("/api/topk", params={"query_set": "test", "k": 3, "measure": "corr"}))
    assert all(isinstance(r["score"], float) for r in body["records"])
    body = strict(client.get("/api/stability", params={"query_set": "test", "k": 3, "measure": "corr", "bootstrap": 0}))
    assert all(r["stderr"] is None for r in body["records"]) and all(isinstance(r["score"], float) for r in body["records"])


def test_unbatched_topk_scores_each_request_alone(served):
    """`--no-batch`: a named-query top-k is one `store.topk` of its own (the served store's, from memory),
    answered in the server's threads, not the expensive lane (its one slot is held here)."""
    import threading

    from fastapi.testclient import TestClient

    store = ServedStore.open_served(served["url"])
    app = create_app(store, batch=False, expensive_queue=0)
    release = threading.Event()
    held = app.state.lane.submit(release.wait)
    try:
        with TestClient(app, base_url=LOCAL) as client:
            body = client.get("/api/topk", params={"query_set": "test", "query": ["q1", "q3"], "k": 4}).raise_for_status().json()
            assert client.get("/api/topk", params={"query_set": "test", "k": 4}).status_code == 503  # a whole set: the lane
    finally:
        release.set()
    held.result(timeout=10)
    assert body["records"] == json.loads(json.dumps(store.topk("test", ["q1", "q3"], k=4, snapshot=store.current()).records()))
