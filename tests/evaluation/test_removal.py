"""Subset removal: `daunce check-removal` on a user's factory and `subset_removal` on the testbeds, with
real stores filled by the runner and real retraining; the direction is held against random removals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import daunce_store  # noqa: E402
from daunce_store.cli import app  # noqa: E402
from daunce_store.errors import InvalidInputError, UnknownQuerySetError  # noqa: E402
from daunce_store.evaluation.removal import RemovalCheck, check_removal, load_chatterbot_topics, subset_removal  # noqa: E402

pytestmark = pytest.mark.train

FACTORY = Path(__file__).resolve().parent / "removal_factory.py"


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> tuple[Path, Path]:
    """A store of 16 runner perturbations of the factory's model, and the run's YAML config."""
    from daunce_store.perturb import PerturbConfig, build_from_config, run_worker

    tmp = tmp_path_factory.mktemp("removal")
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({"factory": f"{FACTORY}:digits", "convergence_probe": 0}))
    cfg = PerturbConfig.from_yaml(config)
    model, task, train, queries = build_from_config(cfg)
    store = daunce_store.init(tmp / "s.zarr", [f"train-{i}" for i in range(len(train))],
                              {"test": [f"test-{j}" for j in range(len(queries["test"]))]})
    run_worker(store, model, task, train, queries, cfg, until=16, progress=False)
    return tmp / "s.zarr", config


def test_check_removal_cli_says_the_helpful_scores_hold(filled) -> None:
    store, config = filled
    out = CliRunner().invoke(app, ["check-removal", str(store), "--config", str(config), "--query-set", "test", "-k", "20",
                                   "--seeds", "2", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "Verdict: the scores hold on this data" in out.output
    assert "delta_top_helpful" in out.output and "delta_random" in out.output


def test_removing_harmful_examples_lowers_the_loss_beyond_random_removals(filled) -> None:
    store, config = filled
    from daunce_store.perturb import PerturbConfig

    r = check_removal(daunce_store.open(store, "r"), PerturbConfig.from_yaml(config), "test", k=40, remove="harmful",
                      seeds=2, base_dir=config.parent, progress=False)
    assert r.verdict == "holds", r.summary()
    assert r.targeted_delta.max() < 0 and r.targeted_delta.max() < r.random_delta.min(), r.summary()
    # The removed examples are the store's top opponents, in rank order.
    ranked = daunce_store.open(store, "r").influence("test", k=40, side="neg")
    assert list(r.removed_ids) == [ranked.train_ids[i] for i in ranked.indices["neg"][0]]


def test_the_verdict_can_say_no() -> None:
    def check(remove: str, targeted: list[float], random: list[float]) -> str:
        return RemovalCheck("q", remove, 5, 100, (), np.zeros(5), np.ones(len(targeted)), np.array(targeted),
                            np.array(random), "cov", 8).verdict

    assert check("helpful", [0.2, 0.3], [0.0, 0.1]) == "holds"
    assert check("helpful", [0.05, 0.07], [0.0, 0.1]) == "weak"
    assert check("helpful", [-0.2, -0.3], [0.0, 0.1]) == "does not hold"
    assert check("harmful", [0.2, 0.3], [0.0, 0.1]) == "does not hold"
    assert check("harmful", [-0.2, -0.3], [0.0, 0.1]) == "holds"


@pytest.mark.parametrize("args, message", [
    (["--query-set", "nope"], "query set"),
    (["--query-set", "test", "-k", "1000"], "k must be a whole number between 1 and 999"),
    (["--query-set", "test", "--seeds", "0"], "seeds must be a whole number >= 1"),
])
def test_check_removal_refuses_bad_input(filled, args, message) -> None:
    store, config = filled
    out = CliRunner().invoke(app, ["check-removal", str(store), "--config", str(config), *args, "--no-progress"])
    assert out.exit_code == 2, out.output
    assert message in out.output


def test_check_removal_needs_the_query_set_from_the_factory(filled, tmp_path) -> None:
    store, _ = filled
    from daunce_store.perturb import PerturbConfig

    cfg = PerturbConfig(factory=f"{FACTORY}:digits", factory_kwargs={"query_set": "other"})
    with pytest.raises(InvalidInputError, match="the factory returns query sets \\['other'\\], not 'test'"):
        check_removal(daunce_store.open(store, "r"), cfg, "test", k=5, progress=False)
    with pytest.raises(UnknownQuerySetError):
        check_removal(daunce_store.open(store, "r"), cfg, "missing", k=5, progress=False)


def test_daunce_top_proponents_raise_the_loss_beyond_every_random_removal_on_digits() -> None:
    r = subset_removal("digits", ns=(40,), num_perturbations=16, methods=("daunce", "grad-cosine"), groups=3,
                       group_size=5, random_seeds=4, progress=False, log=lambda _: None)
    daunce, random_max = r.delta("daunce", 40), r.delta("random", 40)
    assert (daunce > random_max).all(), (daunce, random_max)
    assert daunce.mean() > 5 * max(random_max.max(), 1e-3)
    assert {row["method"] for row in r.rows} == {"random", "daunce", "grad-cosine"}


def test_the_text_testbed_is_real_chatterbot_text() -> None:
    pytest.importorskip("chatterbot_corpus")
    d = load_chatterbot_topics()
    assert d.num_classes == 6 and d.num_features == 256
    assert len(d.y_train) + len(d.y_test) > 900
    assert np.bincount(d.y_train).min() > 50  # every topic has real data
    assert np.allclose(np.linalg.norm(d.x_train, axis=1)[np.linalg.norm(d.x_train, axis=1) > 0], 1.0, atol=1e-5)


def test_subset_removal_refuses_unknown_methods_and_sizes() -> None:
    with pytest.raises(InvalidInputError, match="unknown method"):
        subset_removal("digits", methods=("magic",))
    with pytest.raises(InvalidInputError, match="every N must be between 1 and"):
        subset_removal("digits", ns=(5000,), methods=("grad-cosine",), log=lambda _: None)


def test_eval_removal_cli_prints_the_table() -> None:
    out = CliRunner().invoke(app, ["eval", "removal", "-n", "20", "-K", "4", "--groups", "2", "--group-size", "2",
                                   "--random-seeds", "2", "--method", "daunce", "--method", "grad-cosine"])
    assert out.exit_code == 0, out.output
    assert "subset removal on digits" in out.output
    for word in ("random", "daunce", "grad-cosine", "beats_random"):
        assert word in out.output
