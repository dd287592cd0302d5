"""A perturbation whose fine-tune diverges is refused before anything of it is written, named in one line (not
a traceback), its lease given back, and the worker goes on with the next id; `daunce perturb` then says how
many diverged and exits non-zero. A real digits run: one train example whose D_k membership blows up the
weights (``perturb_factories.digits_blowing_up``), so exactly the perturbation that trains on it diverges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.perturb import PerturbConfig, PerturbationDraw, run_worker  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

HERE = Path(__file__).resolve().parent
RATIO, UNTIL, BAD = 0.3, 3, "000001"


def _poisoned_row(seed: int) -> int:
    """A train row in D_1 but not in D_0 or D_2: only perturbation 1 trains on it."""
    subsets = [set(PerturbationDraw(seed, k, RATIO).subset(F.N_TRAIN).tolist()) for k in range(UNTIL)]
    return next(i for i in range(F.N_TRAIN) if i in subsets[1] and i not in subsets[0] | subsets[2])


def _config(epochs: int) -> PerturbConfig:
    # SGD: a step proportional to the gradient (Adam's would be bounded by lr), as in a diverging fine-tune.
    return PerturbConfig(ratio=RATIO, epochs=epochs, lr=0.01, optimizer="sgd", batch_size=64, eval_batch_size=2048,
                         convergence_probe=0)


def _store(path: Path) -> daunce_store.LossStore:
    tid, qid = F.digits_ids()
    return daunce_store.init(path, tid, {"test": qid}, chunk_rows=4096, capacity=16, seed=0)


@pytest.fixture(scope="module")
def blowing_up():
    torch.set_num_threads(1)
    return F.digits_blowing_up(_poisoned_row(0))


# epochs=1: the example is seen once; the blown-up weights give it a NaN loss at evaluation (the store's
# rule refuses the column). epochs=2: its next visit makes the objective NaN while training.
@pytest.mark.parametrize("epochs, why", [(1, "train losses: 1 losses are NaN, inf or beyond"), (2, "the objective became nan")],
                         ids=["nan-loss", "nan-objective"])
def test_worker_skips_a_diverged_perturbation(tmp_path: Path, capfd: pytest.CaptureFixture[str], blowing_up, epochs: int, why: str) -> None:
    model, task, train, queries = blowing_up
    store = _store(tmp_path / "s.zarr")
    commits = run_worker(store, model, task, train, queries, _config(epochs), until=UNTIL, progress=False, worker="w")
    err = capfd.readouterr().err
    assert [c.perturbation for c in commits] == ["000000", "000002"]  # went on with the next id
    assert not store.is_committed(BAD)
    lines = [line for line in err.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"w: perturbation {BAD} diverged and was not committed" in lines[0] and f"perturbation {BAD}" in lines[0]
    assert why in lines[0] and ("lower learning rate" in lines[0] or "lower the learning rate" in lines[0]), lines[0]
    # Its lease was given back (anyone may claim it at once), and nothing of it was written.
    assert [r["state"] for r in store.lease_table()] == ["released"]
    assert store.claim(BAD, worker="other") is not None
    assert np.isfinite(store.train_losses()).all() and store.num_columns() == 2


def test_cli_run_says_how_many_diverged(tmp_path: Path) -> None:
    """The real entry point (one worker, in this process): committed columns stay, the error line counts and
    names the diverged ids and says what to do, the exit code is non-zero; a rerun redoes only those."""
    import yaml
    from typer.testing import CliRunner

    from daunce_store.cli import app

    store = _store(tmp_path / "s.zarr")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**_config(2).to_dict(), "factory": f"{HERE / 'perturb_factories.py'}:digits_blowing_up",
                                      "factory_kwargs": {"row": _poisoned_row(store.seed)}}))
    result = CliRunner().invoke(app, ["perturb", str(tmp_path / "s.zarr"), "--config", str(config), "--until", str(UNTIL),
                                      "--no-progress", "--no-compact"])
    text = " ".join(result.output.split())
    assert result.exit_code != 0, result.output
    assert f"1 of {UNTIL} perturbations diverged and were not committed ({BAD}); the other 2 are committed" in text, text
    assert "lower the learning rate" in text and "Traceback" not in text
    assert sorted(c.perturbation for c in daunce_store.open(tmp_path / "s.zarr").commits()) == ["000000", "000002"]
