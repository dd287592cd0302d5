"""`daunce demo` through the real entry point, with a tiny K."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.train


def test_demo_runs_and_writes_a_png(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daunce_store.cli", "demo", "--workdir", str(tmp_path), "-K", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    png = tmp_path / "topk.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out.stdout.replace("\n", "")
    assert "proponents" in out.stdout and "opponents" in out.stdout
    assert "overlap" in out.stdout
    assert (tmp_path / "digits.zarr").is_dir()


def test_demo_refuses_too_few_perturbations(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daunce_store.cli", "demo", "--workdir", str(tmp_path), "-K", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode != 0
    assert "--perturbations must be >= 4" in (out.stderr + out.stdout)
