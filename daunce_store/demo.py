"""``daunce demo``: Daunce end to end on scikit-learn's bundled digits (no network, well under a minute).

It trains a torch logistic regression (the target θ0), runs K perturbations with the runner
(:func:`daunce_store.perturb.run_worker`, IF objective, DESIGN §1) into a store, and shows for a few
test queries the top proponents and opponents (a rich table and a PNG grid), then how the top-k settle
as K grows. Needs the ``train`` extra (torch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import daunce_store
from daunce_store._optional import import_optional
from daunce_store.errors import InvalidInputError

__all__ = ["run_demo", "draw_grid"]


def run_demo(
    workdir: Path,
    k_perturbations: int = 64,
    console: Console | None = None,
    *,
    num_queries: int = 4,
    top: int = 5,
    measure: str = "nystrom-corr",
    seed: int = 0,
) -> Path:
    """Run the demo; returns the path of the PNG grid."""
    import_optional("torch", "train", "`daunce demo` (it trains a torch model)")
    import torch

    from daunce_store.evaluation import default_config, fill_store, fit, load_digits_split, make_model, predict_logits
    from daunce_store.perturb import RichReporter

    console = console or Console()
    if k_perturbations < 4:
        raise InvalidInputError(f"--perturbations must be >= 4 (the settling check compares K/2 with K), not {k_perturbations}")
    torch.set_num_threads(1)
    data = load_digits_split(seed=seed)
    model = fit(make_model("logreg"), data.x_train, data.y_train, weight_decay=1e-3)
    acc = float((predict_logits(model, data.x_test).argmax(1) == data.y_test).mean())
    console.print(
        f"[bold]digits[/]: {len(data.y_train)} train / {len(data.y_test)} test images (8×8); target model: "
        f"logistic regression, test accuracy {acc:.1%}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "digits.zarr"
    if path.exists():
        shutil.rmtree(path)
    config = default_config(ratio=1.0)  # r = 1.0: the best worst-case LDS with nystrom (bench/RESULTS.md)
    subsets = "every example perturbed, r = 1.0" if config.ratio == 1.0 else f"{config.ratio:.0%} subsets"
    console.print(f"running K={k_perturbations} Daunce perturbations ({config.objective.upper()} objective, {subsets}; "
                  f"{config.epochs} epochs of Adam, batch {config.batch_size}) into {path}")
    store = fill_store(path, model, data.x_train, data.y_train, {"test": (data.x_test, data.y_test)}, k_perturbations,
                       config=config, seed=seed, progress=RichReporter(console=console), train_ids=data.train_ids)

    # A few queries: the first test images of different digits.
    _, first = np.unique(data.y_test, return_index=True)
    qrows = np.sort(first)[:num_queries]
    queries = [f"test-{j}" for j in qrows]
    result = store.topk("test", queries, k=top, measure=measure)
    pred = predict_logits(model, data.x_test).argmax(1)
    _print_table(console, result, data, pred)
    picture = draw_grid(result, data, workdir / "topk.png")
    console.print(f"picture of the queries and their top training images: [bold]{picture}[/]")

    # How the top-10 settle: the top-10 of the first K/4 and K/2 columns against all K (nested), and
    # of bootstrap resamples of the K columns (store.stability: one pass over the losses).
    k10 = min(10, store.n_train)
    st = store.stability("test", k=k10, measure=measure, fractions=(0.25, 0.5, 1.0), bootstrap=20, seed=seed)
    table = Table(title=f"top-{k10} overlap with the top-{k10} at K={k_perturbations} (mean over all {len(data.y_test)} test queries, {st.measure})")
    for col in ("columns used", "proponents", "opponents"):
        table.add_column(col, justify="right")
    for f, count in enumerate(st.columns[:-1]):
        table.add_row(f"first {count}", f"{st.overlap['pos'][:, f].mean():.0%}", f"{st.overlap['neg'][:, f].mean():.0%}")
    table.add_row("bootstrap resamples of all K", f"{np.nanmean(st.bootstrap_overlap['pos']):.0%}", f"{np.nanmean(st.bootstrap_overlap['neg']):.0%}")
    console.print(table)
    console.print("A larger K (`daunce demo -K 256`) moves these overlaps toward 100%.")
    return picture


def _print_table(console: Console, result: daunce_store.Attribution, data: Any, pred: np.ndarray) -> None:
    table = Table(title=f"top-{result.indices['pos'].shape[1]} proponents (+) and opponents (−) per query "
                        f"(K={result.num_columns}, {result.measure})")
    for col in ("query (label / predicted)", "side", "rank", "train example (label)", "score"):
        table.add_column(col)
    for r in result.records():
        j = int(r["query"].split("-")[1])
        i = int(r["train_id"].split("-")[1])
        table.add_row(
            f"{r['query']} ({data.y_test[j]} / {pred[j]})", "+" if r["side"] == "pos" else "−", str(r["rank"]),
            f"{r['train_id']} ({data.y_train[i]})", f"{r['score']:+.4f}",
        )
    console.print(table)


def draw_grid(result: daunce_store.Attribution, data: Any, out: Path) -> Path:
    """One row per query: the query image, its top proponents, then its top opponents, each titled with
    its label and score."""
    matplotlib = import_optional("matplotlib", "train", "the demo's picture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.indices["pos"].shape[1]
    cols = 2 * k + 2
    fig, axes = plt.subplots(
        len(result.queries), cols, figsize=(1.15 * (cols - 0.7), 1.45 * len(result.queries) + 0.4),
        gridspec_kw={"width_ratios": [1, 0.3] + [1] * (2 * k)},
    )
    axes = np.atleast_2d(axes)
    for j, q in enumerate(result.queries):
        qj = int(q.split("-")[1])
        row = axes[j]
        _panel(row[0], data.x_test[qj], f"query\nlabel {data.y_test[qj]}", "tab:blue")
        row[1].axis("off")
        for side, start, color in (("pos", 2, "tab:green"), ("neg", 2 + k, "tab:red")):
            for r, (i, s) in enumerate(zip(result.indices[side][j], result.scores[side][j])):
                _panel(row[start + r], data.x_train[i], f"label {data.y_train[i]}\n{s:+.3f}", color)
    width = 1.3 + 2 * k  # the width ratios: query, spacer, 2k panels
    fig.text((1.3 + 0.5 * k) / width, 0.995, "top proponents (+)", ha="center", va="top", color="tab:green", fontsize=10)
    fig.text((1.3 + 1.5 * k) / width, 0.995, "top opponents (−)", ha="center", va="top", color="tab:red", fontsize=10)
    fig.suptitle(f"Daunce on digits, K={result.num_columns} ({result.measure})", x=0.02, y=0.995, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _panel(ax: Any, pixels: np.ndarray, title: str, color: str) -> None:
    ax.imshow(np.asarray(pixels).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)
