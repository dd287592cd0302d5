"""The page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium; no browser
download): it loads, a query is picked, its proponents and opponents appear with their content; markup in a
training text shows as text and never runs; a column committed while the page is open shows up on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _serve_support import K, XSS, append_next

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture
def browser() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


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


