"""The centred L2 term (``l2_center: theta0``) and the loss-change record behind the drift share, on real
digits fine-tunes: with zero noise the centred objective's optimum is theta0 (the fine-tune stays there)
while the plain one drifts; the option goes from YAML and the command line into each commit's metadata;
`daunce stability` shows the drift share and the centre."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.errors import ConvergenceWarning, InvalidInputError  # noqa: E402
from daunce_store.perturb import PerturbConfig, l2_penalty, run_perturbation  # noqa: E402
from daunce_store.scoring import drift_share  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

HERE = Path(__file__).resolve().parent
WD = 1e-3  # the factory's theta0 is fitted with this L2 penalty


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return F.digits(l2=WD)


def _store(path: Path) -> daunce_store.LossStore:
    tid, qid = F.digits_ids()
    return daunce_store.init(path, tid, {"test": qid}, seed=0, chunk_rows=4096, capacity=8)


def _theta0_losses(model, task, train) -> np.ndarray:
    with torch.no_grad():
        return task.per_example_loss(model(train.tensors[0]), train.tensors).numpy().astype(np.float64)


def test_l2_penalty_centred_on_theta0_is_zero_there_with_zero_gradient() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    center = [p.detach().clone()]
    assert float(l2_penalty([p], 0.5).detach()) == pytest.approx(0.5 / 2 * 14.0)
    centred = l2_penalty([p], 0.5, center)
    (grad,) = torch.autograd.grad(centred, [p])
    assert float(centred.detach()) == 0.0 and torch.count_nonzero(grad) == 0
    with torch.no_grad():
        p.add_(1.0)
    assert float(l2_penalty([p], 0.5, center).detach()) == pytest.approx(0.5 / 2 * 3.0)


def test_with_zero_noise_the_centred_fine_tune_stays_at_theta0_and_the_plain_one_drifts(tmp_path: Path, digits) -> None:
    """rho = 0: every weight c_ik = 1, the unperturbed objective. Its data term's gradient at theta0 is 0, so
    with lambda/2 ||theta - theta0||^2 theta0 is the optimum and the fine-tune does not move; with
    lambda/2 ||theta||^2 the gradient there is lambda theta0 and every fine-tune drifts (toward a shrunk
    model: the train losses rise)."""
    model, task, train, queries = digits
    base = _theta0_losses(model, task, train)
    store = _store(tmp_path / "s.zarr")
    changes = {}
    for k, center in enumerate(("zero", "theta0")):
        # SGD: a zero gradient moves nothing. (Adam rescales whatever gradient it gets, float round-off of ~1e-9
        # included, into steps of ~lr: measured 25x less loss change than the plain objective's, not none.)
        cfg = PerturbConfig(rho=0.0, ratio=1.0, epochs=2, optimizer="sgd", lr=0.5, weight_decay=WD, l2_center=center,
                            eval_batch_size=2048)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # no noise: nothing to converge to but theta0
            commit = run_perturbation(store, k, model, task, train, queries, cfg)
        column = store.train_losses(slots=[commit.slot])[:, 0].astype(np.float64)
        d = column - base
        changes[center] = d
        # The commit's loss-change record is this column's change from theta0's losses.
        rec = commit.metadata["train_change"]
        assert rec["rows"] == len(base)
        assert rec["sum_sq"] == pytest.approx(float(d @ d), rel=1e-3, abs=1e-9)
        assert rec["mean"] == pytest.approx(float(d.mean()), rel=1e-3, abs=1e-7)
        assert commit.metadata["l2_center"] == center and commit.metadata["config"]["l2_center"] == center
    plain, centred = changes["zero"], changes["theta0"]
    assert plain.mean() > 1e-3 and np.abs(plain).max() > 0.03  # shrinking theta0 raises its train losses
    assert np.abs(centred).max() < 1e-6


def test_option_round_trips_through_yaml_and_is_checked(tmp_path: Path) -> None:
    assert PerturbConfig().l2_center == "zero"
    cfg = PerturbConfig(l2_center="theta0")
    assert PerturbConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "run.yaml"
    path.write_text("l2_center: theta0\n")
    assert PerturbConfig.from_yaml(path).l2_center == "theta0"
    path.write_text("l2_center: origin\n")
    with pytest.raises(InvalidInputError, match=r"l2_center 'origin' is not one of zero, theta0"):
        PerturbConfig.from_yaml(path)
    assert "l2_center" in PerturbConfig.help()
    with pytest.raises(InvalidInputError, match="l2_center 'theta0' is for the 'if' and 'fisher' objectives"):
        PerturbConfig(objective="blackbox", l2_center="theta0")
    assert PerturbConfig(objective="fisher", l2_center="theta0").l2_center == "theta0"


def test_cli_option_reaches_the_commits_and_stability_shows_drift(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from daunce_store.cli import app

    runner = CliRunner()
    store = _store(tmp_path / "s.zarr")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"factory": f"{HERE / 'perturb_factories.py'}:digits", "epochs": 2, "lr": 0.01,
                                      "eval_batch_size": 2048, "weight_decay": WD}))
    bad = runner.invoke(app, ["perturb", store.url, "--config", str(config), "--l2-center", "origin", "-K", "3"])
    assert bad.exit_code == 2 and "origin" in bad.output and not store.commits()
    out = runner.invoke(app, ["perturb", store.url, "--config", str(config), "--l2-center", "theta0", "-K", "3", "--no-progress",
                              "--no-compact"])
    assert out.exit_code == 0, out.output
    commits = daunce_store.open(store.url).commits()
    assert [c.metadata["l2_center"] for c in commits] == ["theta0"] * 3
    assert all(c.metadata["config"]["l2_center"] == "theta0" for c in commits)

    got = runner.invoke(app, ["stability", store.url, "--query-set", "test", "-k", "3", "--bootstrap", "0", "--format", "json"])
    assert got.exit_code == 0, got.output
    body = json.loads(got.stdout)
    assert body["l2_center"] == "theta0"
    assert body["drift_share"] == pytest.approx(drift_share(daunce_store.open(store.url)), abs=1e-9)
    assert 0.0 <= body["drift_share"] < 0.5  # centred: the changes have little in common
    table = runner.invoke(app, ["stability", store.url, "--query-set", "test", "-k", "3", "--bootstrap", "0"])
    assert table.exit_code == 0 and f"drift share {body['drift_share']:.3f}" in " ".join(table.stdout.split())
    assert "L2 centre theta0" in " ".join(table.stdout.split())
