"""`daunce eval` through the CLI app (tiny settings; the real numbers come from bench/lds.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from daunce_store.cli import app  # noqa: E402

pytestmark = pytest.mark.train


def test_eval_mislabel_prints_both_rankings() -> None:
    out = CliRunner().invoke(app, ["eval", "mislabel", "-K", "4"])
    assert out.exit_code == 0, out.output
    assert "Daunce self-influence" in out.output and "target-model loss" in out.output
    assert "72 labels flipped" in out.output


def test_eval_rejects_a_bad_fraction() -> None:
    out = CliRunner().invoke(app, ["eval", "backdoor", "-K", "4", "--fraction", "1.5"])
    assert out.exit_code != 0
    assert "fraction must be in (0, 1)" in out.output
