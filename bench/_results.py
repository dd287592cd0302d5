"""Recording benchmark results: one section of bench/RESULTS.md (the scripts that own a whole section rewrite
only it), and rows of the JSON-lines files under bench/_data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def write_section(section: str, text: str, path: Path) -> None:
    """Replace the section headed ``section`` (a ``## ...`` line) of ``path`` with ``text``, up to the next
    ``## `` heading; append it when the file has no such section yet."""
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    if section in body:
        start = body.index(section)
        nxt = body.find("\n## ", start + len(section))
        body = body[:start] + text.rstrip() + "\n" + (body[nxt:] if nxt >= 0 else "")
    else:
        body = body.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(body)


def append_row(path: Path, row: dict) -> None:
    """Stamp ``row`` with the date and the load average (1 min), print it and append it to the JSON-lines file ``path``."""
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    row["load1"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
