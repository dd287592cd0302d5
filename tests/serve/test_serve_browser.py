"""The page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium; no browser
download): it loads, a query is picked, its proponents and opponents appear with their content; markup in a
training text shows as text and never runs; a column committed while the page is open shows up on its own.
And what a server left running needs: nothing loaded from another origin (the browser's own network log),
/docs offline, a rebound host name refused, the token URL, long tokens wrapped at break points, images
requested only where a row has one, the label once, and the view in the URL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _serve_support import K, PNG, XSS, Server, append_next

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def start_browser(*extra: str) -> Any:
    """Headless Chromium keeping its own network log (``requested``) and console (``console_errors``)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000", *extra):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture
def browser() -> Any:
    driver = start_browser()
    yield driver
    driver.quit()


def requested(driver: Any) -> list[str]:
    """Every URL the browser asked for since the last call, from its own DevTools network log (requests
    that failed or were blocked included, unlike the page's resource timing)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait(driver: Any, what: Any, timeout: float = 30) -> Any:
    return WebDriverWait(driver, timeout).until(what)


def cards(driver: Any, list_id: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, f"#{list_id} > li.card")


def test_pick_a_query_and_see_its_proponents(browser, server, served, tmp_path):
    browser.get(server.url + "/")
    wait(browser, lambda d: len(Select(d.find_element(By.ID, "query")).options) == 5)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    Select(browser.find_element(By.ID, "query")).select_by_value("q2")
    # The lists are for the query picked, with k cards each, every one showing a score, an id, a label
    # and the 4 × 4 pixel picture from the data file.
    wait(browser, lambda d: "q2" in d.find_element(By.ID, "query-view").text and len(cards(d, "pos")) == 6 and len(cards(d, "neg")) == 6)
    first = cards(browser, "pos")[0]
    assert first.find_element(By.CSS_SELECTOR, ".id").text.startswith("t")
    assert float(first.find_element(By.CSS_SELECTOR, ".score").text) > 0
    assert first.find_element(By.CSS_SELECTOR, ".label").text in {"0", "1", "2"}
    assert first.find_element(By.CSS_SELECTOR, "canvas.pixels").get_attribute("width") == "4"
    assert "example number" in first.text or XSS in first.text
    assert float(cards(browser, "neg")[0].find_element(By.CSS_SELECTOR, ".score").text) < 0
    assert "bootstrap_overlap" in browser.find_element(By.ID, "stability").text
    assert browser.find_element(By.ID, "error").text == ""
    shot = tmp_path / "topk.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A column committed while the page is open: the page notices (it polls) and recomputes at K + 1.
    append_next(served)
    wait(browser, lambda d: f"K = {K + 1}" in d.find_element(By.ID, "query-view").text)
    assert browser.find_element(By.ID, "columns").text == f"K = {K + 1}"


def test_markup_in_a_training_text_is_shown_as_text(browser, server):
    """t3's text is a <script> and an <img onerror> payload: the self-influence page lists every train
    example (k = n), so t3 is on it; its text must be visible verbatim and neither handler may have run."""
    browser.get(server.url + "/self-influence")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("120")
    k.send_keys("\t")  # change event
    wait(browser, lambda d: len(cards(d, "self")) == 120)
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#self .text")]
    assert XSS in texts
    assert browser.execute_script("return window.__xss") is None
    assert browser.find_elements(By.CSS_SELECTOR, "#self script, #self img[onerror]") == []
    assert browser.find_element(By.ID, "error").text == ""


def test_a_bad_request_shows_the_servers_message(browser, server):
    browser.get(server.url + "/")
    wait(browser, lambda d: len(cards(d, "pos")) > 0)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("500")
    k.send_keys("\t")
    wait(browser, lambda d: "is larger than the training set (n=120)" in d.find_element(By.ID, "error").text)




def test_nothing_is_loaded_from_another_origin(browser, server):
    """The pages and /docs (Swagger UI, rendered: its operations are listed) ask only this server, by the
    browser's own network log; nothing failed in the console."""
    browser.get(server.url + "/")
    wait(browser, lambda d: len(cards(d, "pos")) > 0 and "bootstrap_overlap" in d.find_element(By.ID, "stability").text)
    browser.get(server.url + "/self-influence")
    wait(browser, lambda d: len(cards(d, "self")) > 0)
    browser.get(server.url + "/docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) >= 9)
    assert "/api/topk" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    urls = requested(browser)
    assert any(u.endswith("/docs-assets/swagger-ui-bundle.js") for u in urls) and any("/api/topk" in u for u in urls)
    foreign = [u for u in urls if not (u.startswith(server.url + "/") or u.startswith("data:"))]
    assert foreign == []
    assert console_errors(browser) == []


def test_a_rebound_host_name_is_refused(server):
    """DNS rebinding in the browser: evil.example resolves to 127.0.0.1 (Chromium's host resolver rules);
    the page the browser gets under that name is the refusal, with no training text."""
    driver = start_browser("--host-resolver-rules=MAP evil.example 127.0.0.1")
    try:
        driver.get(f"http://evil.example:{server.port}/api/examples?id=t1")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "is not one this server answers to" in body and "example number" not in body
        driver.get(f"http://localhost:{server.port}/api/examples?id=t1")
        assert "example number 1" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_the_token_url_opens_the_page(browser, served):
    """Opened once with ?token=, the page is redirected to its URL without the token and its own API
    requests pass on the cookie; a browser without it gets the refusal."""
    from daunce_store.serve import Access, ServedStore, create_app, load_data

    token = "token-for-the-browser-test"
    store = ServedStore.open_served(served["url"])
    with Server(create_app(store, load_data(store, [str(served["data"])]), access=Access(token=token))) as s:
        browser.get(f"{s.url}/?token={token}")
        wait(browser, lambda d: len(cards(d, "pos")) > 0)
        assert "token" not in browser.current_url
        assert browser.find_element(By.ID, "error").text == ""
        other = start_browser()
        try:
            other.get(s.url + "/api/info")
            assert "needs its token" in other.find_element(By.TAG_NAME, "body").text
        finally:
            other.quit()


def test_a_100kb_token_wraps_at_break_points(browser, served, tmp_path):
    """A text that is one 100 KB token: shown whole (the text is unchanged), inside its card (no horizontal
    overflow), with a break opportunity every 32 characters and without `overflow-wrap: anywhere` (which
    froze the tab). Its drawing time is measured in bench/serve_page.py, not here."""
    from daunce_store.serve import ServedStore, create_app, load_data

    token = "".join(chr(97 + (i * 7) % 26) for i in range(100_000))
    data = tmp_path / "long.jsonl"
    with data.open("w") as f:
        for i in range(120):
            f.write(json.dumps({"id": f"t{i}", "text": token if i == 0 else f"an ordinary sentence of example {i}", "label": "x"}) + "\n")
    store = ServedStore.open_served(served["url"])
    with Server(create_app(store, load_data(store, [str(data)]))) as s:
        browser.get(s.url + "/self-influence?k=120")
        wait(browser, lambda d: len(cards(d, "self")) == 120)
        long = browser.execute_script("""
            const e = [...document.querySelectorAll('#self .text')].find((t) => t.textContent.length === 100000);
            const card = e.closest('li.card');
            return {text: e.textContent, breaks: e.querySelectorAll('wbr').length, width: e.getBoundingClientRect().width,
                    cardWidth: card.getBoundingClientRect().width, scrollWidth: e.scrollWidth, clientWidth: e.clientWidth,
                    wrap: getComputedStyle(e).overflowWrap, boxWrap: getComputedStyle(e.parentElement).overflowWrap};""")
        assert long["text"] == token
        assert long["breaks"] == 100_000 // 32 - 1 + (100_000 % 32 > 0)
        assert long["wrap"] == long["boxWrap"] == "break-word"
        assert long["width"] < long["cardWidth"] and long["scrollWidth"] <= long["clientWidth"]
        # Ordinary words get no break points: a sentence is one text node.
        short = browser.execute_script("return [...document.querySelectorAll('#self .text')].find((t) => t.textContent.startsWith('an ordinary')).childNodes.length")
        assert short == 1


def test_images_only_where_a_row_has_one_and_the_label_once(browser, served, tmp_path):
    """Rows t0..t9 have an image file, the others a name that is missing or refused: the browser asks
    /api/image for exactly t0..t9 and logs no error; a text label shows once per card."""
    import pandas as pd

    from daunce_store.serve import ServedStore, create_app, load_data

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    (tmp_path / "img" / "evil.png").symlink_to("/etc/passwd")
    pictures = ["img/a.png" if i < 10 else ("img/gone.png" if i % 2 else "img/evil.png") for i in range(120)]
    labels = ["cat" if i % 2 else "dog" for i in range(120)]
    data = tmp_path / "pictures.csv"
    pd.DataFrame({"id": [f"t{i}" for i in range(120)], "picture": pictures, "label": labels, "caption": "a photo"}).to_csv(data, index=False)
    store = ServedStore.open_served(served["url"])
    with Server(create_app(store, load_data(store, [str(data)]))) as s:
        browser.get(s.url + "/self-influence?k=120")
        wait(browser, lambda d: len(cards(d, "self")) == 120)
        wait(browser, lambda d: d.execute_script("return [...document.images].every((i) => i.complete)"))
        asked = sorted(u.split("id=")[1].split("&")[0] for u in requested(browser) if "/api/image" in u)
        assert asked == sorted(f"t{i}" for i in range(10))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#self img.picture")) == 10
        assert browser.execute_script("return [...document.images].every((i) => i.naturalWidth === 1)")
        assert console_errors(browser) == []
        for card in cards(browser, "self")[:5]:
            label = card.find_element(By.CSS_SELECTOR, ".label").text
            assert label in {"cat", "dog"} and card.text.count(label) == 1 and card.text.count("a photo") == 1


def test_the_url_holds_the_view(browser, server):
    """A linked URL opens that view; a change is written back to the URL, so a reload shows it again."""
    browser.get(server.url + "/?query_set=test&query=q3&k=4&measure=corr")
    wait(browser, lambda d: "q3" in d.find_element(By.ID, "query-view").text and len(cards(d, "pos")) == 4)
    assert "corr" in browser.find_element(By.ID, "query-view").text
    assert Select(browser.find_element(By.ID, "measure")).first_selected_option.get_attribute("value") == "corr"
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    k.send_keys("\t")
    wait(browser, lambda d: len(cards(d, "pos")) == 6 and "k=6" in d.current_url)
    assert "query=q3" in browser.current_url and "measure=corr" in browser.current_url
    browser.refresh()
    wait(browser, lambda d: "q3" in d.find_element(By.ID, "query-view").text and len(cards(d, "pos")) == 6)
    browser.get(server.url + "/self-influence?k=7&side=neg")
    wait(browser, lambda d: len(cards(d, "self")) == 7)
    assert Select(browser.find_element(By.ID, "side")).first_selected_option.get_attribute("value") == "neg"
