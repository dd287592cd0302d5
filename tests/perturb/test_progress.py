"""Time, said: the estimate before the run, train steps and eval rows inside a perturbation, and plain lines
when the output is not a terminal (rich's live display prints nothing there until it stops). The interval is
the mechanism under test: ``DAUNCE_PROGRESS_SECONDS=0`` prints a line at every event; the default prints at
each perturbation's start and commit, and a timer adds one whenever the interval passed without a line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.perturb import PROGRESS_SECONDS_ENV, RichReporter  # noqa: E402
from daunce_store.perturb._progress import _Board  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

HERE = Path(__file__).resolve().parent


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plain_console():
    from rich.console import Console

    out = io.StringIO()
    return Console(file=out, width=200), out


def test_a_line_at_least_every_interval_without_a_terminal(monkeypatch) -> None:
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "30")
    console, out = _plain_console()
    clock = _Clock()
    board = _Board(console, clock=clock)
    assert not board.live and board.interval == 30
    board.handle("", "perturbations", 12, 0)
    board.handle("", "begin", "000000", "train steps", 100)  # a perturbation's start: always a line
    lines = out.getvalue().splitlines()
    assert lines == ["[0:00:00] perturbations 0/12", "[0:00:00] perturbations 0/12; 000000 train steps 0/100"]
    clock.now = 29.0
    board.handle("", "advance", 1)
    board.tick()
    assert len(out.getvalue().splitlines()) == 2  # within the interval: nothing
    clock.now = 30.0
    board.tick()  # the timer's call: the interval passed without a line
    assert out.getvalue().splitlines()[-1] == "[0:00:30] perturbations 0/12; 000000 train steps 1/100"
    board.handle("", "estimate", 10.0, "from 3 timed training steps", False)
    assert out.getvalue().splitlines()[-1] == ("estimate: 12 perturbations ≈ 2.0 min here (1 worker); "
                                               "from 3 timed training steps")
    clock.now = 45.0
    board.handle("", "estimate", 20.0, "measured: perturbation 000000 took 20 s", True)
    board.handle("", "perturbations", 12, 1)  # the commit: the measured estimate, then a line
    assert out.getvalue().splitlines()[-2:] == [
        "estimate: 11 of 12 perturbations ≈ 3.7 min here (1 worker); measured: perturbation 000000 took 20 s",
        "[0:00:45] perturbations 1/12; 000000 train steps 1/100; ≈ 3.7 min left",
    ]


def test_the_interval_is_checked(monkeypatch) -> None:
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "soon")
    with pytest.raises(InvalidInputError, match="DAUNCE_PROGRESS_SECONDS='soon'"):
        RichReporter(console=_plain_console()[0])


def _perturb(tmp_path: Path, factory: str, ids: tuple[list[str], list[str]], *extra: str, seconds: str | None,
             **cfg) -> str:
    import yaml

    store = tmp_path / "s.zarr"
    daunce_store.init(store, ids[0], {"test": ids[1]}, seed=0, capacity=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"factory": f"{HERE / 'perturb_factories.py'}:{factory}", **cfg}))
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_SECONDS_ENV}
    env.update(OMP_NUM_THREADS="1", **({PROGRESS_SECONDS_ENV: seconds} if seconds is not None else {}))
    # stdout and stderr into one pipe: not a terminal, as in a CI log or `> run.log 2>&1`.
    out = subprocess.run([sys.executable, "-m", "daunce_store.cli", "perturb", str(store), "--config", str(config), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout
    return out.stdout


def test_every_event_is_a_line_into_a_pipe(tmp_path: Path) -> None:
    out = _perturb(tmp_path, "digits", F.digits_ids(), "--until", "2", seconds="0", epochs=1, batch_size=200, lr=0.01,
                   ratio=1.0, eval_batch_size=500)
    steps = 6  # one epoch of 1200 examples in batches of 200
    for k in ("000000", "000001"):
        for s in range(steps + 1):
            assert f"{k} train steps {s}/{steps}" in out, out
        for rows in (500, 1000, 1200):
            assert f"{k} train eval rows {rows}/1200" in out, out
        assert f"{k} test eval rows 597/597" in out, out
    assert re.search(r"estimate: 2 perturbations ≈ \S+ (s|min|h) here \(1 worker\); from 3 timed training steps of "
                     r"000000 \(\S+ s each\); the evaluation of 1,797 rows guessed from them", out), out
    assert re.search(r"estimate: 1 of 2 perturbations ≈ \S+ (s|min|h) here \(1 worker\); measured: perturbation "
                     r"000000 took \S+ (s|min)", out), out
    assert "perturbations 2/2" in out and "2 of 2 perturbations committed" in out


def test_by_default_a_line_at_each_start_and_commit_not_each_step(tmp_path: Path) -> None:
    out = _perturb(tmp_path, "digits", F.digits_ids(), "--until", "2", seconds=None, epochs=1, batch_size=200, lr=0.01,
                   ratio=1.0, eval_batch_size=500)
    assert "000000 train steps 0/6" in out and "000001 train steps 0/6" in out  # the starts
    assert "perturbations 1/2; 000000 test eval rows 597/597" in out and "perturbations 2/2" in out  # the commits
    assert "train steps 3/6" not in out and "train eval rows 500/1200" not in out  # the steps (well within 30 s)
    assert "estimate: 2 perturbations ≈" in out


def test_the_hidden_state_cache_of_a_factory_shows_in_the_same_lines(tmp_path: Path) -> None:
    """A factory that caches hidden states (cached_lm) runs inside the worker's reporter: current_reporter()."""
    ids = ([f"t{i}" for i in range(24)], [f"q{j}" for j in range(6)])
    out = _perturb(tmp_path, "tiny_lm_cached", ids, "--until", "1", seconds="0", max_steps=2, batch_size=4,
                   lora={"r": 4, "target_modules": ["q_proj"]})
    assert "cache train θ0 layers 0..0 1/1" in out and "cache test θ0 layers 0..0 1/1" in out, out
    assert "000000 train steps 2/2" in out


@pytest.mark.slow
def test_two_worker_processes_report_to_the_parent_in_plain_lines(tmp_path: Path) -> None:
    out = _perturb(tmp_path, "digits", F.digits_ids(), "--until", "4", "--workers", "2", seconds="0", epochs=1,
                   batch_size=200, lr=0.01, ratio=1.0, eval_batch_size=500)
    assert re.search(r"estimate: \d perturbations? ≈ \S+ (s|min|h) here \(2 workers\)", out), out
    # Each line names the worker of each phase (which worker gets which perturbation is up to the leases).
    assert re.search(r"perturbations \d/4; \S+:w[01] 0000\d\d train steps \d/6", out), out
    assert "perturbations 4/4" in out and "4 of 4 perturbations committed" in out
    # A warning in a worker process is one line naming it (1 epoch of 6 steps stops far from the optimum).
    said = [line for line in out.splitlines() if "ConvergenceWarning" in line]
    assert said and all(re.match(r"warning \(ConvergenceWarning\) in \S+:w[01]: perturbation ", line) for line in said), out
    assert "warnings.warn(" not in out
