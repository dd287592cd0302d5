"""``daunce demo``: Daunce end to end on scikit-learn's bundled digits (no network, a few seconds).

This version uses the black-box form (plain refits on random subsets, DESIGN §1) with a scikit-learn
logistic regression, so it runs from the scoring install alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

import daunce_store

__all__ = ["run_demo"]


def _per_example_loss(model: object, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    proba = model.predict_proba(x)  # type: ignore[attr-defined]
    cols = np.searchsorted(model.classes_, y)  # type: ignore[attr-defined]
    return -np.log(np.clip(proba[np.arange(len(y)), cols], 1e-12, None))


def run_demo(workdir: Path, k_perturbations: int, console: Console) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1500], order[1500:]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "digits.zarr"
    if path.exists():
        shutil.rmtree(path)
    store = daunce_store.init(path, [f"train-{i}" for i in train], {"test": [f"test-{i}" for i in test]}, seed=0)
    for k in track(range(k_perturbations), description="perturbations", console=console):
        sub = np.random.default_rng((store.seed, k)).random(len(train)) < 0.3
        model = LogisticRegression(max_iter=200).fit(x[train][sub], y[train][sub])
        store.append(
            f"p{k:04d}",
            _per_example_loss(model, x[train], y[train]),
            {"test": _per_example_loss(model, x[test], y[test])},
            metadata={"objective": "blackbox", "ratio": 0.3, "seed": [store.seed, k]},
        )
    queries = [f"test-{i}" for i in test[:3]]
    result = store.topk("test", queries, k=5)
    table = Table(title=f"top-5 proponents / opponents (K={result.num_columns})")
    for col in ("query (label)", "side", "rank", "train example (label)", "score"):
        table.add_column(col)
    for r in result.records():
        q = int(r["query"].split("-")[1])
        t = int(r["train_id"].split("-")[1])
        table.add_row(f"{r['query']} ({y[q]})", r["side"], str(r["rank"]), f"{r['train_id']} ({y[t]})", f"{r['score']:.4f}")
    console.print(table)
    picture = _draw(result, x, y, workdir / "topk.png")
    console.print(f"picture of the top examples: {picture}")
    return picture


def _draw(result: daunce_store.Attribution, x: np.ndarray, y: np.ndarray, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.indices["pos"].shape[1]
    fig, axes = plt.subplots(len(result.queries), 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.6 * len(result.queries)))
    axes = np.atleast_2d(axes)
    for j, q in enumerate(result.queries):
        qi = int(q.split("-")[1])
        panels = [(qi, f"query\nlabel {y[qi]}")]
        for side in ("pos", "neg"):
            for i, s in zip(result.indices[side][j], result.scores[side][j]):
                ti = int(result.train_ids[i].split("-")[1])
                panels.append((ti, f"{'+' if side == 'pos' else '-'} {y[ti]}\n{s:.3f}"))
        for ax, (idx, title) in zip(axes[j], panels):
            ax.imshow(x[idx].reshape(8, 8), cmap="gray_r")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
