"""The CLI's JSON is strict JSON, on a store holding extreme losses that appends accept: ±MAX_ABS_LOSS,
subnormals (~1e-40), ordinary values. Every answer parses with ``json.loads`` refusing ``NaN`` and
``Infinity`` (Python writes them as bare tokens by default; other parsers reject them), and every score is
a finite number. Before: `daunce topk --measure cov` on a diverged column printed ``"score": Infinity``, and
`daunce stability --bootstrap 0 --format json` printed ``NaN``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from daunce_store._constants import MAX_ABS_LOSS
from daunce_store.cli import app

runner = CliRunner()
N, M, K = 60, 4, 6


def _strict(text: str) -> Any:
    def reject(token: str) -> Any:
        raise AssertionError(f"the output holds the non-JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def _daunce(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made with `daunce init` and `daunce append`: rows 0-1 at ±MAX_ABS_LOSS in one column (a column close
    to the bound), rows 2-5 subnormal in every column, the rest ordinary; queries alike."""
    tmp = tmp_path_factory.mktemp("extreme")
    rng = np.random.default_rng(0)
    train = rng.standard_normal((N, K)).astype(np.float32)
    train[0, 3], train[1, 3] = MAX_ABS_LOSS, -MAX_ABS_LOSS
    train[2:6] = (rng.standard_normal((4, K)) * 1e-40).astype(np.float32)
    query = rng.standard_normal((M, K)).astype(np.float32)
    query[0, 3] = -MAX_ABS_LOSS
    query[1] = (rng.standard_normal(K) * 1e-40).astype(np.float32)
    (tmp / "train.txt").write_text("\n".join(f"t{i}" for i in range(N)) + "\n")
    (tmp / "test.txt").write_text("\n".join(f"q{j}" for j in range(M)) + "\n")
    path = tmp / "s.zarr"
    _daunce("init", path, "--train-ids", tmp / "train.txt", "--query-set", f"test={tmp / 'test.txt'}", "--chunk-rows", "16")
    for c in range(K):
        np.save(tmp / f"train{c}.npy", train[:, c])
        np.save(tmp / f"test{c}.npy", query[:, c])
        _daunce("append", path, "--perturbation", f"p{c}", "--train", tmp / f"train{c}.npy", "--query", f"test={tmp / f'test{c}.npy'}")
    return path


def _finite_scores(records: list[dict[str, Any]], want: int) -> None:
    assert len(records) == want
    for r in records:
        assert isinstance(r["score"], float) and math.isfinite(r["score"]), r


@pytest.mark.parametrize("measure", ["cov", "corr", "auto", "whitened", "whitened-corr"])
def test_rankings_are_strict_json(store: Path, measure: str) -> None:
    _finite_scores(_strict(_daunce("topk", store, "--query-set", "test", "-k", 5, "--measure", measure, "--format", "json"))["records"], M * 2 * 5)
    lines = _daunce("influence", store, "--query-set", "test", "-k", 5, "--measure", measure, "--format", "jsonl").splitlines()
    _finite_scores([_strict(line) for line in lines], 2 * 5)


@pytest.mark.parametrize("measure", ["cov", "auto"])
def test_self_influence_is_strict_json(store: Path, measure: str) -> None:
    records = _strict(_daunce("self-influence", store, "-k", 8, "--side", "both", "--measure", measure, "--format", "json"))["records"]
    _finite_scores(records, 2 * 8)
    if measure == "cov":  # the ±1e15 rows have the largest variance, the subnormal ones (var 0 in float32) the least
        assert {r["train_id"] for r in records if r["side"] == "pos" and r["rank"] <= 2} == {"t0", "t1"}


@pytest.mark.parametrize("bootstrap", [0, 3])
def test_stability_is_strict_json(store: Path, bootstrap: int) -> None:
    """Without resamples the bootstrap figures are not computed: null, not NaN."""
    out = _strict(_daunce("stability", store, "--query-set", "test", "-k", 3, "--measure", "cov", "--fraction", "0.5",
                          "--fraction", "1.0", "--bootstrap", bootstrap, "--format", "json"))
    _finite_scores(out["records"], M * 2 * 3)
    for rec in out["summary"]:
        assert (rec["bootstrap_overlap"] is None) == (bootstrap == 0), rec
    for rec in out["records"]:
        assert (rec["stderr"] is None) == (bootstrap == 0), rec


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_dense_scores_file_is_strict_json(store: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    _daunce("scores", store, "--query-set", "test", "--measure", "cov", "-o", out)
    text = out.read_text()
    rows = _strict(text) if suffix == ".json" else [_strict(line) for line in text.splitlines()]
    assert len(rows) == N
    values = [v for row in rows for key, v in row.items() if key != "train_id"]
    assert len(values) == N * M and all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_record_writers_refuse_non_finite_values(tmp_path: Path, fmt: str, bad: float) -> None:
    """The last guard, below the kernels' own: no format gets an inf or NaN score, and nothing is written."""
    import io

    from daunce_store.errors import InvalidInputError
    from daunce_store.store import write_records

    records = [{"query": "q0", "score": 0.5}, {"query": "q1", "score": bad}]
    out = tmp_path / f"out.{fmt}"
    with pytest.raises(InvalidInputError, match=r"value\[1\]\['score'\] is (inf|-inf|nan), which no output format may hold"):
        write_records(records, out, fmt, ["query", "score"])
    assert not out.exists() and not list(tmp_path.iterdir())
    if fmt != "parquet":
        stream = io.StringIO()
        with pytest.raises(InvalidInputError):
            write_records(records, stream, fmt, ["query", "score"])
        assert stream.getvalue() == ""
