"""A server you can leave running, over real uvicorn on 127.0.0.1: the Host check (DNS rebinding), the
token off loopback, image files only under their roots, work caps relative to the store, the expensive lane
that keeps top-k answering, and /docs served without any CDN."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from daunce_store.cli import app as cli
from daunce_store.errors import InvalidInputError
from daunce_store.serve import Access, ServedStore, WorkBudget, create_app, load_data
from daunce_store.serve._work import MAX_RECORDS, PASS_FLOOR

from _serve_support import PNG, Server, free_port

TOKEN = "s3cret-token-for-the-tests"


def served_app(served: dict[str, Any], **kwargs: Any) -> Any:
    store = ServedStore.open_served(served["url"])
    return create_app(store, load_data(store, [str(served["data"])]), **kwargs)


# --- Host check ----------------------------------------------------------------------------------------

def test_a_foreign_host_is_refused_on_every_route(server):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends `Host: evil.example`; it must not
    read the training text, nor the page, docs or schema. Loopback names (any port form) are answered."""
    port = server.port
    for path in ("/api/examples?id=t1", "/api/topk?query_set=test&query=q1", "/", "/docs", "/openapi.json", "/static/app.js"):
        r = httpx.get(server.url + path, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403, (path, r.text)
        assert "Host 'evil.example:" in r.json()["error"] and "--allowed-host evil.example" in r.json()["error"]
        assert "example number" not in r.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST.:{port}"):
        assert httpx.get(server.url + "/api/examples?id=t1", headers={"Host": host}).status_code == 200, host


def test_another_sites_page_may_not_send_requests(server):
    """The headers a browser adds to what a page of evil.example makes it send here: an Origin naming it (a
    fetch, a form POST), or Sec-Fetch-Site cross-site for an <img>/<script> pointing here (work started
    blind). A link followed here (a navigation) and this origin's own requests are answered."""
    stability = server.url + "/api/stability?query_set=test&query=q1&bootstrap=2"
    for headers, message in (({"Origin": "http://evil.example"}, "a page of 'http://evil.example' may not send requests"),
                             ({"Origin": "null"}, "a page of 'null' may not"),
                             ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}, "another site")):
        r = httpx.get(stability, headers=headers)
        assert r.status_code == 403 and message in r.json()["error"], headers
        assert httpx.post(server.url + "/api/topk", headers=headers).status_code == 403
    assert httpx.get(server.url + "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}).status_code == 200
    own = {"Origin": server.url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert httpx.get(stability, headers=own, timeout=60).status_code == 200


def test_request_bodies_are_bounded(server):
    """Before any route reads it (a POST route added later included): a body must state its length and stay
    within 1 MiB."""
    from daunce_store.serve._guard import MAX_BODY_BYTES

    big = httpx.post(server.url + "/api/topk", content=b"x" * (MAX_BODY_BYTES + 1))
    assert big.status_code == 413 and f"over this server's cap of {MAX_BODY_BYTES}" in big.json()["error"]
    chunked = httpx.post(server.url + "/api/topk", content=iter([b"{}"]))  # a generator: sent chunked
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    assert httpx.post(server.url + "/api/topk", content=b"{}").status_code == 405  # within the cap: the route's own answer


def test_allowed_hosts_are_added_to_loopback(served):
    with Server(served_app(served, access=Access(allowed_hosts=("myhost.lan",)))) as s:
        assert httpx.get(s.url + "/api/info", headers={"Host": f"myhost.lan:{s.port}"}).status_code == 200
        assert httpx.get(s.url + "/api/info", headers={"Host": "other.lan"}).status_code == 403
        assert httpx.get(s.url + "/api/info").status_code == 200


# --- token -------------------------------------------------------------------------------------------

def test_the_token_is_needed_and_taken_once_from_the_url(served):
    with Server(served_app(served, access=Access(token=TOKEN))) as s:
        refused = httpx.get(s.url + "/api/examples", params={"id": "t1"})
        assert refused.status_code == 401 and "needs its token" in refused.json()["error"] and "example number" not in refused.text
        assert httpx.get(s.url + "/api/info", headers={"Authorization": "token wrong-token-wrong-token"}).status_code == 401
        assert httpx.get(s.url + "/api/info", headers={"Authorization": f"token {TOKEN}"}).status_code == 200
        assert httpx.get(s.url + "/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # The printed URL: a cookie for the page's own requests and a redirect to the URL without the token.
        first = httpx.get(s.url + "/", params={"token": TOKEN, "k": "5"})
        assert first.status_code == 303 and first.headers["location"] == "/?k=5"
        cookie = first.headers["set-cookie"]
        assert f"daunce-token-{s.port}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with httpx.Client(base_url=s.url, cookies=first.cookies) as browser_like:
            assert browser_like.get("/api/examples", params={"id": "t1"}).json()["examples"]["t1"] is not None
        assert httpx.get(s.url + "/api/info", params={"token": "x" * len(TOKEN)}).status_code == 401
        assert httpx.get(s.url + "/api/info", headers={"Cookie": "daunce-token-1=\x7f; ;;="}).status_code == 401  # junk


def test_off_loopback_needs_a_token_or_an_explicit_no():
    with pytest.raises(InvalidInputError, match="--host 0.0.0.0 is off loopback: anyone who can reach it would read the data"):
        Access(host="0.0.0.0")
    with pytest.raises(InvalidInputError, match="--host myhost.lan is off loopback"):
        Access(host="myhost.lan")
    with pytest.raises(InvalidInputError, match="give --token or --no-token, not both"):
        Access(host="0.0.0.0", token=TOKEN, no_token=True)
    with pytest.raises(InvalidInputError, match="at least 16 characters"):
        Access(token="short")
    assert Access(host="0.0.0.0", no_token=True).hosts == ("localhost", "127.0.0.1", "::1")
    assert Access(host="10.1.2.3", token=TOKEN).hosts == ("localhost", "127.0.0.1", "::1", "10.1.2.3")
    assert Access(host="localhost").token is None and Access(host="127.0.0.2").token is None  # loopback: no token needed


def _start_cli(args: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "daunce_store.cli", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"})
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, port
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "daunce serve did not answer within 60 s"
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    return proc.communicate(timeout=20)[1]


def test_cli_off_loopback_makes_a_token_and_prints_it_once(served):
    proc, port = _start_cli([served["url"], "--data", str(served["data"]), "--host", "0.0.0.0"])
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/info").status_code == 401
    finally:
        err = _stop(proc)
    assert err.count("?token=") == 1, err
    token = err.split("?token=")[1].split()[0]
    assert len(token) >= 16 and "add the name clients use with --allowed-host NAME" in err

    proc, port = _start_cli([served["url"], "--host", "0.0.0.0", "--token", TOKEN])
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", headers={"Authorization": f"token {TOKEN}"}).status_code == 200
    finally:
        _stop(proc)

    proc, port = _start_cli([served["url"], "--host", "0.0.0.0", "--no-token"])
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/info").status_code == 200
    finally:
        err = _stop(proc)
    assert "warning: --no-token on 0.0.0.0: anyone who can reach port" in err and "?token=" not in err


def test_cli_refuses_token_and_no_token(served):
    result = CliRunner().invoke(cli, ["serve", served["url"], "--token", TOKEN, "--no-token"])
    assert result.exit_code == 2 and "give --token or --no-token, not both" in result.output


# --- files ----------------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A data folder with a real image and hostile names, and a folder outside it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    (data / "ok.png").write_bytes(PNG)
    (data / "notes.txt").write_text("private notes")
    (outside / "far.png").write_bytes(PNG)
    (outside / "secret.txt").write_text("secret")
    (data / "evil.png").symlink_to("/etc/passwd")
    (data / "sneaky.png").symlink_to(outside / "secret.txt")
    (data / "renamed.png").symlink_to(data / "notes.txt")
    (data / "via-link.png").symlink_to(outside / "far.png")
    return {"data": data, "outside": outside}


ROWS = {"t0": "ok.png", "t1": "evil.png", "t2": "sneaky.png", "t3": "renamed.png", "t4": "missing.png", "t5": "notes.txt",
        "t6": "../outside/far.png", "t7": "via-link.png"}


def image_app(served: dict[str, Any], files: dict[str, Path], roots: tuple[str, ...] = ()) -> Any:
    import pandas as pd

    path = files["data"] / "pictures.csv"
    pd.DataFrame({"id": list(ROWS), "picture": list(ROWS.values())}).to_csv(path, index=False)
    store = ServedStore.open_served(served["url"])
    return create_app(store, load_data(store, [str(path)], roots))


def test_image_files_only_under_their_roots(served, files):
    """Each hostile name is refused by the rule it breaks (symlinks followed); only real images under the
    data file's folder are served, and the answer for the page names no file it would be refused."""
    cases = {
        "t0": (200, None),
        "t1": (403, "lies, symlinks followed, outside the folders files are served from"),
        "t2": (403, "outside the folders files are served from"),
        "t3": (403, "links to a file whose name is not an image's"),
        "t4": (404, "is not on disk"),
        "t5": (403, "is not an image file name"),
        "t6": (403, "--files-root FOLDER"),
        "t7": (403, "outside the folders files are served from"),
    }
    with Server(image_app(served, files)) as s:
        for example, (code, message) in cases.items():
            r = httpx.get(s.url + "/api/image", params={"id": example, "column": "picture"})
            assert r.status_code == code, (example, r.text)
            if code == 200:
                assert r.content == PNG and r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
            else:
                assert message in r.json()["error"] and "root:" not in r.text and "secret" not in r.text
        shown = httpx.get(s.url + "/api/examples", params={"id": list(cases)}).json()["examples"]
        assert {e: shown[e]["fields"][0]["value"] for e in cases} == {**dict.fromkeys(cases), "t0": "ok.png"}


def test_files_root_adds_a_folder(served, files):
    with Server(image_app(served, files, (str(files["outside"]),))) as s:
        for example in ("t6", "t7"):  # a relative path out, a link out: now under a root
            r = httpx.get(s.url + "/api/image", params={"id": example, "column": "picture"})
            assert r.status_code == 200 and r.content == PNG
        assert httpx.get(s.url + "/api/image", params={"id": "t2", "column": "picture"}).status_code == 403  # still not an image
    with pytest.raises(InvalidInputError, match="--files-root .*nope: not a folder"):
        image_app(served, files, (str(files["outside"] / "nope"),))


# --- bounded work ------------------------------------------------------------------------------------------

def test_an_over_budget_request_is_refused_naming_the_cap(served):
    """--max-work = 8 floor passes (n × K = 1200 is under the floor): a pass for one query costs 1 + 1/64 of
    one, so 7 fit: 3 fractions + 4 resamples. bootstrap=4 is answered, 5 is refused naming bootstrap=4."""
    with Server(served_app(served, max_work=8 * PASS_FLOOR)) as s:
        limits = httpx.get(s.url + "/api/info").json()["limits"]
        assert limits["max_bootstrap_one_query"] == 4
        ask = {"query_set": "test", "query": "q1", "k": 3}
        ok = httpx.get(s.url + "/api/stability", params={**ask, "bootstrap": 4}, timeout=60)
        assert ok.status_code == 200, ok.text
        over = httpx.get(s.url + "/api/stability", params={**ask, "bootstrap": 5})
        assert over.status_code == 400
        assert over.json()["error"].startswith("bootstrap=5 for 1 queries is over this server's cap of bootstrap=4 (at n=120, K=10; --max-work 2097152)")
        many = httpx.get(s.url + "/api/stability", params={**ask, "bootstrap": 10_000})  # the issue's 11.5 s request
        assert many.status_code == 400 and "cap of bootstrap=4" in many.json()["error"]


def test_the_default_budget_refuses_the_issues_request(server):
    r = httpx.get(server.url + "/api/stability", params={"query_set": "test", "bootstrap": 10_000, "k": 100})
    assert r.status_code == 400 and "over this server's cap of bootstrap=" in r.json()["error"]


def test_caps_grow_with_the_store():
    """The caps are relative to the store: queries per request and resamples shrink as n × K grows; answers
    are capped at MAX_RECORDS per side."""
    small, big = WorkBudget(10_000, lambda: 16), WorkBudget(1_000_000, lambda: 64)
    assert small.max_queries() > big.max_queries() > 0
    assert small.limits()["max_bootstrap_one_query"] > big.limits()["max_bootstrap_one_query"] > 0
    with pytest.raises(InvalidInputError, match=f"2000 queries in one request is over this server's cap of {big.max_queries()}"):
        big.check(k=10, queries=2000)
    with pytest.raises(InvalidInputError, match=f"k=1000 for 200 queries is 200000 records per side, over this server's cap of {MAX_RECORDS}"):
        big.check(k=1000, queries=200)
    big.check(k=10, queries=big.max_queries())  # at the cap: allowed
    with pytest.raises(InvalidInputError, match="--max-work must be a whole number"):
        WorkBudget(10, lambda: 1, max_work=10)


def test_top_k_is_answered_while_the_expensive_lane_is_full(served):
    """The expensive lane is held (its one slot by a job waiting on an event, its one queue place by a
    stability request): a top-k for a named query is still answered, another expensive request is refused
    at once with 503 naming the cap, and once released the queued stability is answered."""
    app = served_app(served, expensive_slots=1, expensive_queue=1)
    lane = app.state.lane
    release = threading.Event()
    with Server(app) as s:
        blocker = lane.submit(release.wait)
        queued: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("r", httpx.get(
            s.url + "/api/stability", params={"query_set": "test", "query": "q2", "k": 3, "bootstrap": 2}, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 30
        while lane.held < 2:  # the stability request is in the lane's queue
            assert time.monotonic() < deadline, "the stability request did not reach the lane"
            time.sleep(0.01)
        try:
            top = httpx.get(s.url + "/api/topk", params={"query_set": "test", "query": "q1", "k": 4}, timeout=30)
            assert top.status_code == 200 and len(top.json()["records"]) == 8
            assert not blocker.done() and lane.held == 2  # answered while the lane was full
            busy = httpx.get(s.url + "/api/influence", params={"query_set": "test", "k": 3})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"].startswith("busy: 1 expensive request(s) running and 1 queued (this server's cap, --expensive-slots / --expensive-queue)")
            whole = httpx.get(s.url + "/api/topk", params={"query_set": "test", "k": 4})  # a whole set is expensive too
            assert whole.status_code == 503
        finally:
            release.set()
        waiter.join(timeout=60)
        assert queued["r"].status_code == 200 and len(queued["r"].json()["records"]) == 6
        assert httpx.get(s.url + "/api/topk", params={"query_set": "test", "k": 4}).status_code == 200


# --- /docs offline ------------------------------------------------------------------------------------------

def test_docs_are_served_from_here(server):
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "cdn" not in page.text.lower()
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(server.url + "/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert "/api/topk" in httpx.get(server.url + "/openapi.json").json()["paths"]
