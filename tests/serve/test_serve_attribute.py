"""`POST /api/attribute` and the page's new-output box: a new example evaluated under the K adapters a recipe store
kept, through a real uvicorn server (and headless Chromium for the page), under the server's protections.
The recipe store is the perturb tests' tiny random Llama with real training (fast path, LoRA, adapters kept)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

# The tiny Llama, its tokenizer and data rows come from the perturb tests' helpers.
sys.path.insert(0, str(Path(__file__).parents[1] / "perturb"))

import httpx  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _serve_support import Server  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory) -> dict[str, Any]:
    """A recipe store (K = 3, n = 12, query set ``test`` of 3) made by `daunce perturb --recipe causal-lm` with its
    defaults, and the query rows it was given."""
    import perturb_factories as F
    from test_recipes import _pairs, _tokenizer, _write

    from daunce_store.cli import app

    tmp = tmp_path_factory.mktemp("serve-attr")
    model = tmp / "llama"
    tok = _tokenizer()
    F.tiny_llama(len(tok), num_layers=4).save_pretrained(model)
    tok.save_pretrained(model)
    train = _write(tmp / "train.jsonl", [{"id": f"t{i:02d}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(12))])
    rows = [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(3, offset=12))]
    queries = _write(tmp / "q.jsonl", rows)
    store = tmp / "s.zarr"
    result = CliRunner().invoke(app, ["perturb", str(store), "--recipe", "causal-lm", "--model", str(model), "--train", str(train),
                                      "--queries", f"test={queries}", "-K", "3", "--max-steps", "2", "--batch-size", "4",
                                      "--no-progress", "--no-compact"])
    assert result.exit_code == 0, result.output
    return {"url": str(store), "queries": rows}


@pytest.fixture(scope="module")
def recipe_server(recipe_store) -> Any:
    """The recipe store served with its remembered data files (no --data), as `daunce serve STORE` does."""
    from daunce_store.serve import ServedStore, create_app, load_data, remembered_data

    store = ServedStore.open_served(recipe_store["url"])
    with Server(create_app(store, load_data(store, remembered_data(store)))) as s:
        yield s


def test_a_new_example_gets_the_stored_querys_answer(recipe_server, recipe_store):
    """A new example identical to stored query q1: the same top-k as GET /api/topk for q1 (its losses under the
    kept adapters are the runner's own), in the same envelope."""
    q1 = recipe_store["queries"][1]
    asked = httpx.post(recipe_server.url + "/api/attribute",
                       json={"prompt": q1["prompt"], "completion": q1["completion"], "k": 4, "measure": "corr"}, timeout=120)
    assert asked.status_code == 200, asked.text
    new = asked.json()
    stored = httpx.get(recipe_server.url + "/api/topk", params={"query_set": "test", "query": "q1", "k": 4, "measure": "corr"}).json()
    assert set(new) >= {"measure", "num_columns", "records"} and new["num_columns"] == 3 and new["measure"] == "corr"
    assert {r["query"] for r in new["records"]} == {"new-0"}
    for side in ("pos", "neg"):
        mine = [r for r in new["records"] if r["side"] == side]
        theirs = [r for r in stored["records"] if r["side"] == side]
        assert [r["train_id"] for r in mine] == [r["train_id"] for r in theirs]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in theirs], rtol=1e-3, atol=1e-5)
    # Many rows with their own ids; the info the page reads says attribute is available, for a causal LM.
    many = httpx.post(recipe_server.url + "/api/attribute",
                      json={"rows": recipe_store["queries"], "k": 2, "side": "pos"}, timeout=120).json()
    assert sorted({r["query"] for r in many["records"]}) == ["q0", "q1", "q2"] and {r["side"] for r in many["records"]} == {"pos"}
    info = httpx.get(recipe_server.url + "/api/info").json()["attribute"]
    assert info == {"available": True, "recipe": "causal-lm", "reason": None}


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"rows": [{"prompt": "a", "completion": "b"}] * 17}, 400, "17 new examples in one request is over this server's cap of 16"),
    ({"prompt": "x" * 40_000, "completion": "y"}, 400, "40001 characters in one request is over this server's cap of 32000"),
    ({"prompt": "a", "completion": "b", "k": 13}, 400, "larger than the training set"),
    ({"prompt": "only a prompt"}, 400, "give the new example: prompt and completion"),
    ({"prompt": "a", "completion": "b", "measure": "nope"}, 400, "nope"),
    ({"rows": [{"prompt": "a", "completion": "b", "id": "x"}, {"prompt": "c", "completion": "d", "id": "x"}]}, 400, "repeat an id"),
    ({"prompt": "a", "completion": "b", "k": "many"}, 422, "k: Input should be a valid integer"),
    ({"prompt": 3, "completion": "b"}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "a", "completion": "b", "k": 0}, 400, "k must be"),
])
def test_bad_requests_are_refused_with_their_reason(recipe_server, body, status, message):
    answer = httpx.post(recipe_server.url + "/api/attribute", json=body, timeout=120)
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_a_cross_site_post_is_refused(recipe_server):
    """The guard covers the new route: a page on another origin cannot make the server run K forward passes."""
    answer = httpx.post(recipe_server.url + "/api/attribute", json={"prompt": "a", "completion": "b"},
                        headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403


def test_a_store_without_kept_models_says_why(tmp_path):
    """A store no recipe made: the info says why attribute is off, and the route refuses naming it."""
    from _serve_support import K, M, N, losses, make_store

    from daunce_store.serve import ServedStore, create_app

    train, query = losses(N, M, K)
    store = ServedStore.open_served(make_store(tmp_path / "plain.zarr", train, query))
    with Server(create_app(store)) as s:
        info = httpx.get(s.url + "/api/info").json()["attribute"]
        assert info["available"] is False and info["recipe"] is None and "not made by a recipe" in info["reason"]
        answer = httpx.post(s.url + "/api/attribute", json={"prompt": "a", "completion": "b"})
        assert answer.status_code == 400
        assert answer.json()["error"].startswith("this server cannot attribute new examples: this store was not made by a recipe")


def test_the_page_attributes_a_typed_output(recipe_server, recipe_store):
    """Type a prompt and an output on /attribute: the new example and its proponents and opponents appear,
    each train card with its text from the remembered train file; the answer equals the API's."""
    from test_serve_browser import cards, start_browser, wait

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    q0 = recipe_store["queries"][0]
    expected = httpx.post(recipe_server.url + "/api/attribute",
                          json={"prompt": q0["prompt"], "completion": q0["completion"], "k": 3, "measure": "corr"}, timeout=120).json()
    browser = start_browser()
    try:
        browser.get(recipe_server.url + "/attribute")
        wait(browser, lambda d: d.find_element(By.ID, "columns").text == "K = 3")
        browser.find_element(By.ID, "prompt").send_keys(q0["prompt"])
        browser.find_element(By.ID, "completion").send_keys(q0["completion"])
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("3")
        Select(browser.find_element(By.ID, "measure")).select_by_value("corr")
        browser.find_element(By.ID, "ask").click()
        wait(browser, lambda d: d.find_element(By.ID, "error").text or (len(cards(d, "pos")) == 3 and len(cards(d, "neg")) == 3),
             timeout=120)
        assert browser.find_element(By.ID, "error").text == ""
        view = browser.find_element(By.ID, "query-view").text
        assert "New example (corr, K = 3)" in view and q0["completion"] in view
        shown = [c.find_element(By.CSS_SELECTOR, ".id").text for c in cards(browser, "pos")]
        assert shown == [r["train_id"] for r in expected["records"] if r["side"] == "pos"]
        train_file = Path(httpx.get(recipe_server.url + "/api/info").json()["data"]["train"]["path"])
        train = {row["id"]: row for row in map(json.loads, train_file.read_text().splitlines())}
        assert train[shown[0]]["completion"] in cards(browser, "pos")[0].text
        assert "measure=corr" in browser.current_url and "k=3" in browser.current_url
    finally:
        browser.quit()


def test_the_page_says_why_when_a_store_kept_no_models(tmp_path):
    from test_serve_browser import start_browser, wait

    from selenium.webdriver.common.by import By

    from _serve_support import K, M, N, losses, make_store

    from daunce_store.serve import ServedStore, create_app

    train, query = losses(N, M, K)
    store = ServedStore.open_served(make_store(tmp_path / "plain.zarr", train, query))
    with Server(create_app(store)) as s:
        browser = start_browser()
        try:
            browser.get(s.url + "/attribute")
            wait(browser, lambda d: "cannot be attributed" in d.find_element(By.ID, "attribute-hint").text)
            assert "not made by a recipe" in browser.find_element(By.ID, "attribute-hint").text
            assert browser.find_element(By.ID, "ask").get_attribute("disabled") is not None
        finally:
            browser.quit()
