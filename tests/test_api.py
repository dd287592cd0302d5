"""The public Python API: real signatures (no **kwargs), each entry point called with keyword arguments,
and the scoring install working without the training stack."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
import textwrap

import pytest

import daunce_store
from daunce_store.errors import MissingDependencyError

PUBLIC = ["topk", "influence", "self_influence", "stability", "scores", "to_pandas", "export", "status",
          "append", "snapshot", "iter_row_blocks", "train_losses", "query_losses", "compact"]


@pytest.mark.parametrize("name", PUBLIC)
def test_signatures_are_explicit(name):
    sig = inspect.signature(getattr(daunce_store.Store, name))
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()), f"Store.{name}{sig} takes **kwargs"
    assert sig.return_annotation is not inspect.Signature.empty, f"Store.{name} has no return annotation"


def test_every_entry_point_with_keywords(tmp_path, small_store):
    store, train, query = small_store  # n = 300, m = 7, K = 12
    assert isinstance(daunce_store.open(url=store.url, mode="r"), daunce_store.Store)
    top = store.topk(query_set="test", queries=["q1"], k=3, measure="cov", side="pos", backend="numpy", columns=[0, 2, 4, 6])
    assert top.indices["pos"].shape == (1, 3) and top.num_columns == 4
    assert store.influence(query_set="test", k=2, measure="whitened", side="neg").indices["neg"].shape == (1, 2)
    assert store.self_influence(k=4, measure="cov", side="both").scores["pos"].shape == (1, 4)
    st = store.stability(query_set="test", k=2, measure="corr", fractions=(0.5,), bootstrap=2, seed=1)
    assert st.columns == (6, 12)
    dense = store.scores(query_set="test", measure="cov", aggregate="mean").to_pandas()
    assert dense.shape == (300, 1) and dense.index.name == "train_id"
    assert len(store.to_pandas(form="long")) == (300 + 7) * 12
    assert store.export(path=tmp_path / "l.csv", form="wide") == 307
    assert store.status()["committed_columns"] == 12
    top.write(tmp_path / "top.json")
    assert json.loads((tmp_path / "top.json").read_text()) == {"measure": "cov", "num_columns": 4, "records": top.records()}


def test_scoring_install_needs_no_training_stack(tmp_path):
    """Scoring, exports and the CLI run with torch, transformers, peft, scikit-learn and matplotlib absent."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "peft", "sklearn", "scipy", "matplotlib"):
            sys.modules[name] = None  # importing any of them now fails
        import numpy as np, daunce_store
        store = daunce_store.init({str(tmp_path / 'p.zarr')!r}, ["a", "b", "c", "d"], {{"q": ["x"]}})
        rng = np.random.default_rng(0)
        for k in range(4):
            store.append(f"p{{k}}", rng.random(4), {{"q": rng.random(1)}})
        print(store.topk("q", k=2).measure, store.self_influence(k=1).measure)
        from daunce_store.cli import app
        from daunce_store.evaluation import _digits
        try:
            _digits.load_split("digits")
        except daunce_store.errors.MissingDependencyError as e:
            print("missing:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "whitened-corr whitened"  # topk: auto-corr; self-influence: auto
    assert "pip install 'daunce-store[train]'" in out.stdout


def test_missing_extra_is_a_clear_error():
    from daunce_store._optional import import_optional

    with pytest.raises(MissingDependencyError, match=r"needs no_such_module_xyz .*daunce-store\[train\]"):
        import_optional("no_such_module_xyz", "train", "this feature")


def test_attribution_writes_to_a_stream_in_every_text_format(small_store, tmp_path):
    import pandas as pd

    store, _, _ = small_store
    top = store.topk(query_set="test", queries=["q1", "q2"], k=3, measure="cov")
    want = top.records()
    out = io.StringIO()
    top.write(out, "json")  # the envelope the server answers with
    assert json.loads(out.getvalue()) == {"measure": "cov", "num_columns": top.num_columns, "records": want}
    out = io.StringIO()
    top.write(out, "jsonl")
    assert [json.loads(line) for line in out.getvalue().splitlines()] == want
    out = io.StringIO()
    top.write(out, "csv")
    frame = pd.read_csv(io.StringIO(out.getvalue()), dtype={"train_id": str})
    assert frame.to_dict("records") == pd.DataFrame.from_records(want).to_dict("records")
    top.write(tmp_path / "top.jsonl")
    assert [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()] == want
    with pytest.raises(daunce_store.errors.InvalidInputError, match="give the format"):
        top.write(io.StringIO())
    with pytest.raises(daunce_store.errors.InvalidInputError, match="binary format"):
        top.write(io.StringIO(), "parquet")


def test_cli_json_answer_loads_neither_pandas_nor_numba(small_store):
    """The interactive path stays light: a json `daunce topk` imports no pandas (0.3 s) and, with the
    extension built, no numba (0.2 s)."""
    from daunce_store.store._read import extension

    if extension() is None:
        pytest.skip("without the extension, auto picks numba")
    store, _, _ = small_store
    code = textwrap.dedent(f"""
        import json, sys
        from daunce_store.cli import app
        try:
            app(["topk", {store.url!r}, "--query-set", "test", "--query", "q1", "-k", "3", "--format", "json"])
        except SystemExit as e:
            assert not e.code, e.code
        print(json.dumps(sorted(m for m in ("pandas", "numba", "torch") if m in sys.modules)), file=sys.stderr)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r["rank"] for r in json.loads(out.stdout)["records"]] == [1, 2, 3, 1, 2, 3]
    assert out.stderr.strip().splitlines()[-1] == "[]"
