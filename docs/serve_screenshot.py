"""Make the README's pictures of `daunce serve` (docs/serve.png, docs/serve-self.png) on the digits demo.

    python docs/serve_screenshot.py              # needs the train extra (torch, scikit-learn), serve extra, chromium

Builds what `daunce demo` builds (a torch logistic regression on scikit-learn's digits, K = 64 IF-form
perturbations, r = 1.0) into ``daunce-demo/digits.zarr``, unless that store already holds 64 columns; writes
the images as data files (``id``, ``label``, ``pixels``: the 64 pixel values in [0, 1]); serves them on a free
127.0.0.1 port and photographs the top-k page (a query picked in the form) and the self-influence page with
Debian's headless Chromium through selenium.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import daunce_store
from daunce_store.serve import ServedStore, create_app, load_data

DOCS = Path(__file__).resolve().parent
WORK = Path("daunce-demo")
K = 64


def build_store(path: Path) -> None:
    import torch

    from daunce_store.evaluation import default_config, fill_store, fit, load_digits_split, make_model

    torch.set_num_threads(2)
    data = load_digits_split(seed=0)
    model = fit(make_model("logreg"), data.x_train, data.y_train, weight_decay=1e-3)
    fill_store(path, model, data.x_train, data.y_train, {"test": (data.x_test, data.y_test)}, K,
               config=default_config(ratio=1.0), seed=0, progress=True, train_ids=data.train_ids)


def write_data(workdir: Path) -> tuple[Path, Path]:
    from daunce_store.evaluation import load_digits_split

    data = load_digits_split(seed=0)
    out = []
    for name, ids, x, y in (("train", data.train_ids, data.x_train, data.y_train), ("test", data.test_ids, data.x_test, data.y_test)):
        path = workdir / f"digits-{name}.jsonl"
        with path.open("w") as f:
            for i, xi, yi in zip(ids, x, y):
                f.write(json.dumps({"id": i, "label": int(yi), "pixels": [round(float(v), 4) for v in xi]}) + "\n")
        out.append(path)
    return out[0], out[1]


def main() -> None:
    WORK.mkdir(exist_ok=True)
    store_path = WORK / "digits.zarr"
    if not (store_path.exists() and daunce_store.open(store_path, "r").num_columns() == K):
        build_store(store_path)
    train, test = write_data(WORK)
    store = ServedStore.open_served(str(store_path))
    app = create_app(store, load_data(store, [str(train), f"test={test}"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,740"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: len(Select(d.find_element(By.ID, "query")).options) > 0)
        Select(driver.find_element(By.ID, "measure")).select_by_value("nystrom-corr")  # the top lists read best
        query = sys.argv[1] if len(sys.argv) > 1 else "test-3"
        Select(driver.find_element(By.ID, "query")).select_by_value(query)
        wait.until(lambda d: query in d.find_element(By.ID, "query-view").text
                   and "nystrom-corr" in d.find_element(By.ID, "query-view").text
                   and len(d.find_elements(By.CSS_SELECTOR, "#neg > li")) == 8)
        time.sleep(0.5)
        driver.save_screenshot(str(DOCS / "serve.png"))
        driver.get(f"http://127.0.0.1:{port}/self-influence")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#self > li")) == 24)
        time.sleep(0.5)
        driver.save_screenshot(str(DOCS / "serve-self.png"))
    finally:
        driver.quit()
        server.should_exit = True
    print(f"wrote {DOCS / 'serve.png'} and {DOCS / 'serve-self.png'}")


if __name__ == "__main__":
    main()
