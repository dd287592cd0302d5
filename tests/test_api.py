"""The public Python API: real signatures (no **kwargs), each entry point called with keyword arguments,
and the scoring install working without the training stack."""

from __future__ import annotations

import inspect
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
    assert (tmp_path / "top.json").read_text().lstrip().startswith("[")


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
    assert out.stdout.splitlines()[0] == "whitened whitened"
    assert "pip install 'daunce-store[train]'" in out.stdout


def test_missing_extra_is_a_clear_error():
    from daunce_store._optional import import_optional

    with pytest.raises(MissingDependencyError, match=r"needs no_such_module_xyz .*daunce-store\[train\]"):
        import_optional("no_such_module_xyz", "train", "this feature")
