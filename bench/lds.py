"""The accuracy benchmark: LDS of Daunce vs gradient / influence-function / TRAK baselines on digits,
backdoor retrieval and mislabel detection. Writes bench/lds_vs_k.png, bench/accuracy.json and the
``## Accuracy (LDS, backdoor, mislabel)`` section of bench/RESULTS.md.

    python bench/lds.py                 # the full run (~10 minutes on 2 CPU cores)
    python bench/lds.py --quick         # a smoke run (small S and K), does not touch RESULTS.md
    python bench/lds.py --render --mlp  # only the MLP comparison (~10 minutes), then re-render
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from daunce_store.evaluation._daunce import default_config
from daunce_store.evaluation.lds import compare_methods
from daunce_store.evaluation.poison import run_backdoor, run_mislabel

HERE = Path(__file__).resolve().parent
SECTION = "## Accuracy (LDS, backdoor, mislabel)"


def plot(rows: list[dict], out: Path, title: str = "LDS on digits logistic regression (50% subsets)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    curves = sorted({r["method"] for r in rows if r["K"] is not None})
    for i, m in enumerate(curves):
        pts = sorted((r["K"], r["lds"], r["std"] or 0.0) for r in rows if r["method"] == m)
        k, v, s = map(np.array, zip(*pts))
        color = {"Daunce cov (r=1.0)": "tab:red", "Daunce cov (r=0.3)": "tab:orange", "Daunce corr (r=1.0)": "tab:green",
                 "Daunce corr (r=0.3)": "tab:olive"}.get(m, f"C{i}")
        ax.errorbar(k, v, yerr=s, marker="o", capsize=3, label=m, color=color, linestyle="-" if "cov" in m else "--")
    flat = {r["method"]: r["lds"] for r in rows if r["K"] is None}
    trak = {m: v for m, v in flat.items() if m.startswith("TRAK")}
    best_trak = max(trak, key=trak.get)
    shown = [  # a few reference lines, not every grid point (the table has them all)
        ("influence function (exact H)", "black", "-"),
        ("Daunce Fisher-form limit K→∞ (analytic)", "tab:red", ":"),
        ("Daunce IF-form limit K→∞ (analytic)", "tab:red", "-."),
        (best_trak, "tab:purple", "-"),
        ("TRAK (traker, M=10, λ=1)", "tab:purple", "--"),
        ("gradient dot", "tab:gray", "--"),
        ("TRAK (traker, M=10, λ=0)", "tab:purple", ":"),
    ]
    for m, color, style in shown:
        if m in flat:
            ax.axhline(flat[m], color=color, linestyle=style, linewidth=1.2, label=f"{m}: {flat[m]:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (perturbed models)")
    ax.set_ylabel("LDS (mean Spearman over queries)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in body:
        start = body.index(SECTION)
        nxt = body.find("\n## ", start + len(SECTION))
        body = body[:start] + text.rstrip() + "\n" + (body[nxt:] if nxt >= 0 else "")
    else:
        body = body.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(body)


def compute(quick: bool) -> dict:
    ks = (8, 16, 32) if quick else (8, 16, 32, 64, 128, 256)
    subsets = 20 if quick else 100
    configs = {"r=0.3": default_config(ratio=0.3), "r=1.0": default_config(ratio=1.0)}
    t0 = time.perf_counter()
    cmp = compare_methods(ks=ks, num_subsets=subsets, trak_models=10, daunce_configs=configs, progress=False)
    k_eval = 32 if quick else 128
    backdoor = run_backdoor(num_perturbations=k_eval, baselines=True)
    mislabel = run_mislabel(num_perturbations=k_eval)
    mislabel_r1 = run_mislabel(num_perturbations=k_eval, config=default_config(ratio=1.0))
    return {
        "elapsed_s": round(time.perf_counter() - t0, 1), "machine": platform.machine(),
        "lds": cmp.rows, "settings": cmp.settings,
        "backdoor": {**backdoor.__dict__, "precision": {m: {str(k): v for k, v in p.items()} for m, p in backdoor.precision.items()},
                     "rows": backdoor.rows()},
        "mislabel": {"r=0.3": mislabel.rows(), "r=1.0": mislabel_r1.rows(), "num_flipped": mislabel.num_flipped,
                     "random_precision": mislabel.random_precision, "num_perturbations": mislabel.num_perturbations},
    }


def compute_mlp() -> dict:
    """The same LDS comparison on a non-convex model: a 64-32-10 tanh MLP (2410 parameters)."""
    t0 = time.perf_counter()
    cmp = compare_methods(model_kind="mlp", if_damping=1e-3, ks=(8, 16, 32, 64, 128), num_subsets=60, trak_models=10,
                          daunce_configs={"r=1.0": default_config(ratio=1.0)}, progress=False)
    return {"elapsed_s": round(time.perf_counter() - t0, 1), "lds": cmp.rows, "settings": cmp.settings}


def render_mlp(d: dict) -> str:
    s = d["settings"]
    flat = {r["method"]: r["lds"] for r in d["lds"] if r["K"] is None}
    curve = {(r["method"], r["K"]): r["lds"] for r in d["lds"] if r["K"] is not None}
    best_trak = max(v for m, v in flat.items() if m.startswith("TRAK"))
    return f"""### LDS on a non-convex model (MLP)

The same comparison on a 64-32-10 tanh MLP (2410 parameters, test accuracy {s['target_test_accuracy']:.3f}), S = {s['num_subsets']}
subsets, each retrained with full-batch L-BFGS from θ0's own initialization (deterministic); the exact Hessian has
small negative eigenvalues here, so the influence function adds {s['if_damping']}·I. Run: `python bench/lds.py --mlp`
({d['elapsed_s']:.0f} s, one run).

{md_table(d['lds'], ['method', 'K', 'lds', 'std', 'groups', 'seconds'])}

![LDS vs K, MLP](lds_vs_k_mlp.png)

Reading: the ordering is the same as for logistic regression and Daunce is further behind: at K = 128 it
reaches {curve[('Daunce cov (r=1.0)', 128)]:.3f}, against {flat['TRAK (traker, M=10, λ=1)']:.3f} for TRAK at λ = 1, {best_trak:.3f} for TRAK at
the best λ and {flat['influence function (exact H)']:.3f} for the damped exact-Hessian influence function (2410 parameters still
allow forming H); its own K→∞ limits are {flat['Daunce IF-form limit K→∞ (analytic)']:.3f} (IF form) and
{flat['Daunce Fisher-form limit K→∞ (analytic)']:.3f} (Fisher form).
"""


def render(d: dict) -> str:
    rows = d["lds"]
    s = d["settings"]
    flat = {r["method"]: r["lds"] for r in rows if r["K"] is None}
    curve = {(r["method"], r["K"]): r["lds"] for r in rows if r["K"] is not None}
    best128 = max((v, m, k) for (m, k), v in curve.items() if k <= 128)
    trak_default = max(v for m, v in flat.items() if m.startswith("TRAK") and "λ=0)" in m)
    trak_best = max((v, m) for m, v in flat.items() if m.startswith("TRAK"))
    if_exact = flat["influence function (exact H)"]
    lim_if, lim_fisher = flat["Daunce IF-form limit K→∞ (analytic)"], flat["Daunce Fisher-form limit K→∞ (analytic)"]
    b, ml = d["backdoor"], d["mislabel"]
    brow = b["rows"]

    def c1(k: int) -> float:
        return curve[("Daunce cov (r=1.0)", k)]
    kflip = ml["num_flipped"]
    return f"""{SECTION}

Run: `python bench/lds.py` ({d['elapsed_s']:.0f} s on {d['machine']}, 2 CPU cores shared with other jobs, one run;
the raw numbers are in `bench/accuracy.json`). Testbed: scikit-learn digits, {s['n_train']} train / {s['n_queries']} test
images; target model = logistic regression (650 parameters) fitted to convergence (full-batch L-BFGS) on mean
cross-entropy + {s['weight_decay']}/2·‖θ‖², test accuracy {s['target_test_accuracy']:.3f}.

### LDS

S = {s['num_subsets']} random 50% subsets; the target model is retrained on each (convex and fitted to convergence,
so one seed is exact) and every test query's **margin** (true logit − logsumexp of the others) is recorded.
A method's prediction for subset s is Σ_{{i∈D_s}} τ(i, j) with τ > 0 = proponent (training on i raises j's
margin and lowers its loss; Daunce's cov/corr of *loss* columns have that sign, so no sign flip is needed;
measuring the loss instead, the prediction is −Σ τ — `lds(..., output="loss")` does that). LDS = mean over
queries of the Spearman correlation over subsets.

* Daunce: the runner (`run_worker`), IF objective, ρ = γ = 1, Adam lr 3e-3 with cosine decay, 20 epochs of
  batch 64 over D_k, signal = loss, at subset ratio r = 0.3 (the paper's default) and r = 1.0 (every example
  perturbed in every column). Each K row is the mean ± std over up to 8 disjoint groups of K columns of one
  store of 256 perturbations, i.e. what one run at that K gets.
* Influence function: the exact 650 × 650 Hessian of the training objective (weight decay included; no
  extra damping needed), τ = ∇ℓ_jᵀ H⁻¹ ∇ℓ_i.
* TRAK: MadryLab's `traker` 0.3.2 on CPU (its BasicProjector, Gaussian, proj_dim {s['trak_proj_dim']}, fp32),
  M = 1 (the target) or M = {s['trak_models']} models trained on independent random halves, for
  λ (traker's `lambda_reg`, added to ΦᵀΦ) ∈ {s['trak_lambdas']}. λ was picked on these same subsets, so the best
  TRAK row is optimistic for TRAK.
* "Daunce limit K→∞": what Daunce estimates when the fine-tunes reach their minimizers, computed exactly:
  g_iᵀH⁻¹FH⁻¹g_j (IF form) and g_iᵀF⁻¹g_j (Fisher form), F = mean ggᵀ.

{md_table(rows, ['method', 'K', 'lds', 'std', 'groups', 'seconds'])}

![LDS vs K](lds_vs_k.png)

**Reading, honestly.** Best Daunce at K ≤ 128 is {best128[0]:.3f} ({best128[1]}, K={best128[2]}); K = 256 gives
{max(v for (m, k), v in curve.items() if k == 256):.3f}. That beats gradient dot/cosine ({flat['gradient dot']:.3f}/{flat['gradient cosine']:.3f})
and TRAK as `traker` ships it (λ = 0: {trak_default:.3f}; ΦᵀΦ is nearly singular without damping), and matches TRAK
with λ = 1, but it is **below TRAK with a tuned λ ({trak_best[0]:.3f}, {trak_best[1]}) and far below the exact influence
function ({if_exact:.3f})**. The goal (Daunce at K ≤ 128 above TRAK and IF) is **not met on this benchmark**. Why, and
what closes it:

1. This testbed is the best case for the baselines: a convex 650-parameter model whose Hessian can be formed
   and inverted exactly, so the IF is nearly the ground truth of leave-many-out retraining, and TRAK (which for a
   linear model is an IF with a Gauss-Newton Hessian) approaches it once damped. Daunce's selling point, needing
   no Hessian and no gradients (LLMs, black-box fine-tuning APIs), does not show here.
2. Even with infinitely many perturbations Daunce's IF form estimates g H⁻¹FH⁻¹ g, whose LDS is {lim_if:.3f}, not
   the IF's g H⁻¹ g ({if_exact:.3f}): the per-example noise of the objective has the covariance of the *empirical*
   Fisher F of the loss gradients, which differs from H. The Fisher form's limit is {lim_fisher:.3f}. Perturbing with
   noise whose covariance is the Gauss-Newton matrix (e.g. output-space noise drawn from the model's own
   predictive, not ±ρ times the observed gradient) would make the limit the IF itself; a quick prototype of
   that (outside the runner, r = 1.0, same fine-tune) was no better at finite K (0.53 at K = 128), so it raises
   the ceiling, not the K ≤ 128 numbers.
3. At finite K the estimate is noisy: the gap from the K = 128 row to the K→∞ limit halves roughly every 4× in K
   (LDS {c1(8):.2f} → {c1(32):.2f} → {c1(128):.2f} for K = 8 → 32 → 128 at r = 1.0). r = 1.0 beats the paper's r = 0.3 here
   ({c1(128):.3f} vs {curve[('Daunce cov (r=0.3)', 128)]:.3f} at K = 128) because every column then carries every example's random weight. cov beats corr on LDS
   (corr divides out each example's loss scale, which LDS — a sum over examples — needs).

### Backdoor retrieval

{b['num_poisoned']} train images ({b['random_precision']:.1%}) get a 4-pixel bar trigger on the (always blank) left edge and
label 0; attack success on triggered test images {b['attack_success']:.0%}, clean test accuracy {b['clean_accuracy']:.1%}.
Queries: {b['num_queries']} triggered test images of other digits, queried with label 0. Precision@k of poisoned examples
among each query's top-k proponents (mean over queries), K = {b['num_perturbations']}, r = 0.3; random ranking
expects {b['random_precision']:.3f}. Test: `tests/evaluation/test_poison.py` (K = 16, corr P@10 ≥ 0.4).

{md_table(brow, list(brow[0]))}

### Mislabel detection

{kflip} train labels ({ml['random_precision']:.1%}) flipped to another class; the target model is trained on the noisy
labels. Ranking by Daunce self-influence (variance of the loss over K = {ml['num_perturbations']} perturbations,
`store.self_influence`) against ranking by the target model's own loss; precision P and recall R in the top
k = {kflip} and {2 * kflip}; random ranking expects P = {ml['random_precision']:.3f}. Test: `tests/evaluation/test_poison.py`
(K = 16, P@{kflip} ≥ 0.6, R@{2 * kflip} ≥ 0.8).

r = 0.3:

{md_table(ml['r=0.3'], list(ml['r=0.3'][0]))}

r = 1.0:

{md_table(ml['r=1.0'], list(ml['r=1.0'][0]))}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small S and K; prints, writes nothing")
    ap.add_argument("--render", action="store_true", help="re-render RESULTS.md and the plot from bench/accuracy.json")
    ap.add_argument("--mlp", action="store_true", help="also (re)run the MLP comparison into bench/accuracy_mlp.json")
    args = ap.parse_args()
    if args.mlp:
        m = compute_mlp()
        (HERE / "accuracy_mlp.json").write_text(json.dumps(m, indent=1, default=str))
    if args.render:
        d = json.loads((HERE / "accuracy.json").read_text())
    else:
        d = compute(args.quick)
        print(f"done in {d['elapsed_s']:.0f}s")
        if args.quick:
            return
        (HERE / "accuracy.json").write_text(json.dumps(d, indent=1, default=str))
    plot(d["lds"], HERE / "lds_vs_k.png")
    text = render(d)
    if (HERE / "accuracy_mlp.json").exists():
        m = json.loads((HERE / "accuracy_mlp.json").read_text())
        plot(m["lds"], HERE / "lds_vs_k_mlp.png", title="LDS on digits MLP (50% subsets)")
        text = text.rstrip() + "\n\n" + render_mlp(m)
    write_section(text, HERE / "RESULTS.md")
    print(text)


if __name__ == "__main__":
    main()
