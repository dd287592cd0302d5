"""Writing one section of bench/RESULTS.md (the scripts that own a whole section rewrite only it)."""

from __future__ import annotations

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
