"""How long the page takes to draw a text that is one long token (not a test).

    python bench/serve_page.py --old-src /tmp/serve_old   # this page against the page of another checkout

A store of 120 train rows and a data file where every fourth row holds one unbroken token of ``--size``
characters (default 100 KB; the others a short sentence), served by `daunce serve` (this code, and with
``--old-src`` the code of another checkout, e.g. 928b9d9 with its kernel, whose CSS had
``overflow-wrap: anywhere``). Headless Chromium (Debian's, via selenium) opens ``/self-influence`` (the
page's default k = 24: the same cards on both, the long tokens among them) ``--repeat`` times; a draw is the
time from navigation until the 24 cards are in the page and two animation frames have passed (layout and
paint done), reported with how many long tokens were drawn. Rows go to ``bench/_data/serve_page.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from _serve_support import losses, make_store  # noqa: E402  (the tests' small store)
from topk import DATA  # noqa: E402
from serve_mixed import _start as start_server  # noqa: E402  (one way to start `daunce serve` and wait for it)

RESULTS = DATA / "serve_page.jsonl"


def _draws(url: str, repeat: int) -> list[tuple[float, int]]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    driver.set_script_timeout(600)
    driver.set_page_load_timeout(600)
    out = []
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            driver.get(url + "/self-influence")
            shown = driver.execute_async_script("""
                const done = arguments[0];
                const count = () => [...document.querySelectorAll('#self .text')].filter((e) => e.textContent.length > 1000).length;
                const check = () => document.querySelectorAll('#self > li.card').length === 24
                    ? requestAnimationFrame(() => requestAnimationFrame(() => done(count()))) : setTimeout(check, 5);
                check();""")
            out.append((time.perf_counter() - t, shown))
    finally:
        driver.quit()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--old-src")
    args = p.parse_args()
    folder = DATA / "serve_page"
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "s.zarr"
    if not store.exists():
        make_store(store, *losses(120, 5, 10))
    rng = np.random.default_rng(0)
    token = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), args.size))
    data = folder / f"long_{args.size}.jsonl"
    with data.open("w") as f:
        for i in range(120):
            f.write(json.dumps({"id": f"t{i}", "text": token if i % 4 == 0 else f"an ordinary sentence, example {i}", "label": i % 3}) + "\n")
    for name, src in (("this page", None), *((("old page", args.old_src),) if args.old_src else ())):
        proc, url = start_server(store, ["--data", str(data)], src)
        try:
            draws = _draws(url, args.repeat)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        row = {"page": name, "token_chars": args.size, "long_tokens_drawn": draws[0][1], "draws_s": [round(d, 3) for d, _ in draws],
               "median_s": round(float(np.median([d for d, _ in draws])), 3),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load1": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
