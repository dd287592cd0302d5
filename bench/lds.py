"""The accuracy benchmark: LDS of Daunce's score measures against gradient / influence-function / TRAK
baselines on four testbeds, then backdoor retrieval and mislabel detection per measure.

Testbeds (each is one ``compare_methods`` call; every measure is scored from the same stored columns):

* ``lr``  — digits, logistic regression (650 parameters)          → bench/accuracy.json,  lds_vs_k.png
* ``mlp`` — digits, 64-32-10 tanh MLP (2410 parameters)           → bench/accuracy_mlp.json, lds_vs_k_mlp.png
* ``bc``  — breast_cancer, 30-32-2 tanh MLP (1058 parameters)     → bench/accuracy_breast_cancer.json,
  lds_vs_k_breast_cancer.png
* ``dia`` — diabetes progression tertiles, 10-32-32-3 SiLU MLP (1507 parameters) → bench/accuracy_diabetes.json,
  lds_vs_k_diabetes.png (issue 25's new testbed: regression data with overlapping classes, a deeper net)
* ``poison`` — backdoor and mislabel on digits logistic regression → bench/accuracy_poison.json

It writes the ``## Accuracy (LDS, backdoor, mislabel)`` section of bench/RESULTS.md from the JSON files.

    python bench/lds.py                    # everything (~30 minutes on 2 busy CPU cores)
    python bench/lds.py --only bc,poison   # recompute some parts, re-render from all JSON files
    python bench/lds.py --render           # only re-render RESULTS.md and the plots
    python bench/lds.py --quick            # a smoke run (small S and K); prints, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from _results import write_section  # bench/_results.py (the script's folder is on sys.path)
from daunce_store.evaluation import MEASURES, SELF_MEASURES, default_config
from daunce_store.evaluation.lds import compare_methods
from daunce_store.evaluation.poison import run_backdoor, run_mislabel

HERE = Path(__file__).resolve().parent
SECTION = "## Accuracy (LDS, backdoor, mislabel)"
KS = (16, 32, 64, 128, 256)
RATIOS = ("r=0.3", "r=1.0")
TESTBEDS: dict[str, dict[str, Any]] = {
    "lr": {"json": "accuracy.json", "plot": "lds_vs_k.png", "title": "digits, logistic regression",
           "kwargs": {"dataset": "digits", "model_kind": "logreg", "num_subsets": 100}},
    "mlp": {"json": "accuracy_mlp.json", "plot": "lds_vs_k_mlp.png", "title": "digits, tanh MLP",
            "kwargs": {"dataset": "digits", "model_kind": "mlp", "if_damping": 1e-3, "num_subsets": 60}},
    "bc": {"json": "accuracy_breast_cancer.json", "plot": "lds_vs_k_breast_cancer.png", "title": "breast_cancer, tanh MLP",
           "kwargs": {"dataset": "breast_cancer", "model_kind": "mlp", "if_damping": 1e-3, "num_subsets": 100}},
    "dia": {"json": "accuracy_diabetes.json", "plot": "lds_vs_k_diabetes.png", "title": "diabetes tertiles, two-layer SiLU MLP",
            "kwargs": {"dataset": "diabetes", "model_kind": "mlp2", "if_damping": 1e-3, "num_subsets": 100}},
    "chat": {"json": "accuracy_chatterbot.json", "plot": "lds_vs_k_chatterbot.png", "title": "chatterbot text topics, logistic regression",
             "kwargs": {"dataset": "chatterbot", "model_kind": "logreg", "num_subsets": 100}},
}
POISON_JSON = "accuracy_poison.json"
MEASURE_COLORS = {"cov": "tab:red", "corr": "tab:olive", "whitened": "tab:blue", "whitened-corr": "tab:cyan",
                  "nystrom": "tab:green", "nystrom-corr": "tab:pink"}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, Python {platform.python_version()}"


def code_version() -> str:
    """The commit the numbers come from (and whether the working tree had uncommitted changes; the result files
    the benches write, bench/*.json, *.png and RESULTS.md, do not count)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/*.json", ":(top,exclude)bench/*.png",
                                ":(top,exclude)bench/RESULTS.md"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def compute_testbed(name: str, quick: bool) -> dict:
    spec = TESTBEDS[name]
    kwargs = dict(spec["kwargs"])
    if quick:
        kwargs.update(num_subsets=20, n_queries=60)
    ks = (16, 32) if quick else KS
    configs = {label: default_config(ratio=float(label[2:])) for label in RATIOS}
    t0 = time.perf_counter()
    cmp = compare_methods(ks=ks, trak_models=3 if quick else 10, daunce_configs=configs, progress=False, **kwargs)
    return {"testbed": name, "title": spec["title"], "elapsed_s": round(time.perf_counter() - t0, 1), "machine": machine(), "code": code_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "lds": cmp.rows, "settings": cmp.settings}


def compute_poison(quick: bool) -> dict:
    k = 32 if quick else 128
    t0 = time.perf_counter()
    out: dict[str, Any] = {"num_perturbations": k, "backdoor": {}, "mislabel": {}}
    for label in RATIOS:
        config = default_config(ratio=float(label[2:]))
        b = run_backdoor(num_perturbations=k, config=config, measures=MEASURES, baselines=label == RATIOS[0])
        out["backdoor"][label] = {**{f: getattr(b, f) for f in ("random_precision", "num_poisoned", "num_queries", "attack_success",
                                                              "clean_accuracy")}, "rows": b.rows()}
        m = run_mislabel(num_perturbations=k, config=config, measures=SELF_MEASURES)
        out["mislabel"][label] = {"num_flipped": m.num_flipped, "random_precision": m.random_precision, "rows": m.rows()}
    out.update(elapsed_s=round(time.perf_counter() - t0, 1), machine=machine(), code=code_version(), date=time.strftime("%Y-%m-%d %H:%M %Z"))
    return out


# --- rendering -------------------------------------------------------------------------------------------
def fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def curve(d: dict, measure: str, label: str) -> dict[int, float]:
    return {r["K"]: r["lds"] for r in d["lds"] if r["measure"] == measure and r["config"] == label}


def flat(d: dict) -> dict[str, float]:
    return {r["method"]: r["lds"] for r in d["lds"] if r["K"] is None}


def best_trak(d: dict) -> tuple[float, str]:
    return max((v, m) for m, v in flat(d).items() if m.startswith("TRAK"))


def trak_sketch(d: dict) -> dict[str, dict[int, tuple[float, float]]]:
    """{method: {K: (LDS, best λ)}} for the TRAK proj=K rows (one method per ensemble size)."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for r in d["lds"]:
        if r["method"].startswith("TRAK proj=K"):
            out.setdefault(r["method"], {})[r["K"]] = (r["lds"], r["lambda"])
    return out


def ks_of(d: dict) -> list[int]:
    return sorted({r["K"] for r in d["lds"] if r["K"] is not None})


def pivot(d: dict) -> str:
    """Daunce LDS per measure and r (rows) and K (columns), with TRAK proj=K beneath."""
    ks = ks_of(d)
    head = "| measure | r | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 2)]
    for label in d["settings"]["daunce_configs"]:
        for measure in d["settings"]["measures"]:
            c = curve(d, measure, label)
            std = {r["K"]: r["std"] for r in d["lds"] if r["measure"] == measure and r["config"] == label}
            cells = [f"{c[k]:.3f}" + (f" ± {std[k]:.3f}" if std.get(k) else "") if k in c else "" for k in ks]
            lines.append(f"| {measure} | {label[2:]} | " + " | ".join(cells) + " |")
    for method, sk in trak_sketch(d).items():
        name = method.replace("TRAK proj=K (traker, ", "TRAK proj=K (")
        lines.append(f"| {name} | | " + " | ".join(f"{sk[k][0]:.3f} (λ={sk[k][1]:g})" if k in sk else "" for k in ks) + " |")
    return "\n".join(lines)


def baselines_table(d: dict) -> str:
    f = flat(d)
    s = d["settings"]
    rows = [{"method": m, "LDS": v} for m, v in f.items() if not m.startswith("TRAK")]
    lines = [md_table(rows, ["method", "LDS"]), "", f"| TRAK (traker, proj_dim {s['trak_proj_dim']}) λ | M=1 | M={s['trak_models']} |", "|---|---|---|"]
    m = s["trak_models"]
    for lam in s["trak_lambdas"]:
        one, many = f.get(f"TRAK (traker, M=1, λ={lam:g})"), f.get(f"TRAK (traker, M={m}, λ={lam:g})")
        lines.append(f"| {lam:g} | {fmt(one)} | {fmt(many)} |")
    return "\n".join(lines)


def plot(d: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(d["settings"]["daunce_configs"])
    fig, axes = plt.subplots(1, len(labels), figsize=(6.0 * len(labels) + 2.5, 4.6), sharey=True, squeeze=False)
    f = flat(d)
    trak_v, trak_m = best_trak(d)
    sk = trak_sketch(d)
    for ax, label in zip(axes[0], labels):
        for measure in d["settings"]["measures"]:
            pts = sorted((r["K"], r["lds"], r["std"] or 0.0) for r in d["lds"] if r["measure"] == measure and r["config"] == label)
            k, v, s = map(np.array, zip(*pts))
            ax.errorbar(k, v, yerr=s, marker="o", capsize=3, label=f"Daunce {measure}", color=MEASURE_COLORS.get(measure),
                        linestyle="--" if measure.endswith("corr") else "-")
        for method, c in sk.items():
            k = sorted(c)
            m1 = "M=1," in method
            ax.plot(k, [c[x][0] for x in k], marker="s", color="tab:purple", linestyle=":" if m1 else "-.", alpha=1.0 if m1 else 0.6,
                    label=method.replace("(traker, ", "("))
        for m, v, color, style in (("influence function (exact H)", f.get("influence function (exact H)"), "black", "-"),
                                   (trak_m, trak_v, "tab:purple", "-"), ("gradient dot", f.get("gradient dot"), "tab:gray", "--")):
            if v is not None:
                ax.axhline(v, color=color, linestyle=style, linewidth=1.2, label=f"{m}: {v:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (perturbed models)")
        ax.set_title(f"{d['title']}, {label}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("LDS (mean Spearman over queries)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


TIE = 0.01  # worst cases this close are a tie (the seed spread); the mean over the testbeds breaks it


def worst_case(beds: dict[str, dict]) -> tuple[list[dict], dict[int, tuple[str, str, float]]]:
    """Per (measure, r): the LDS on each testbed and the minimum over testbeds, per K; and the winner per K: the best
    worst case, or among worst cases within :data:`TIE` of it the best mean over the testbeds."""
    ks = sorted(set.intersection(*(set(ks_of(d)) for d in beds.values())))
    rows, winners, means = [], {}, {}
    for label in RATIOS:
        for measure in MEASURES:
            row: dict[str, Any] = {"measure": measure, "r": label[2:]}
            for k in ks:
                vals = [curve(d, measure, label).get(k) for d in beds.values()]
                row[f"K={k}"] = None if None in vals else min(vals)
                means[measure, label[2:], k] = None if None in vals else float(np.mean(vals))
            rows.append(row)
    for k in ks:
        cand = [(r[f"K={k}"], r["measure"], r["r"]) for r in rows if r[f"K={k}"] is not None]
        if cand:
            best = max(v for v, _, _ in cand)
            _, v, m, r = max((means[m, r, k], v, m, r) for v, m, r in cand if v >= best - TIE)
            winners[k] = (m, r, v)
    return rows, winners


def reading(beds: dict[str, dict], winners: dict[int, tuple[str, str, float]], poison: dict | None) -> str:
    """The numbers a reader needs next to the tables, taken from them (nothing here is typed in by hand)."""
    k_head = 128 if 128 in winners else max(winners)
    m, r, _ = winners[k_head]
    label = f"r={r}"
    other = "r=0.3" if label == "r=1.0" else "r=1.0"
    same = [k for k, (wm, wr, _) in winners.items() if (wm, wr) == (m, r)]
    lines = [f"* **Default: {m} at r = {r}.** It has the best worst case at K = {', '.join(map(str, same))}"
             + ("" if len(same) == len(winners) else
                " (elsewhere: " + "; ".join(f"K = {k}: {wm}, r = {wr}" for k, (wm, wr, _) in winners.items() if k not in same) + ")")
             + "."]
    for d in beds.values():
        c, cov, alt = curve(d, m, label), curve(d, "cov", label), curve(d, m, other)
        f = flat(d)
        tv, tm = best_trak(d)
        sk1 = next((v for meth, v in trak_sketch(d).items() if "M=1," in meth), {})
        ks = [k for k in (64, 128, 256) if k in c]
        lines.append(
            f"* {d['title']}: {m} " + " / ".join(f"{c[k]:.3f}" for k in ks) + f" at K = {' / '.join(map(str, ks))}; cov (same r) "
            + " / ".join(f"{cov[k]:.3f}" for k in ks) + f"; {m} at {other} " + " / ".join(f"{alt[k]:.3f}" for k in ks)
            + f". TRAK at its best λ {tv:.3f} ({tm.replace('TRAK (traker, ', '').rstrip(')')})"
            + (f", TRAK proj=K with one model at K = {k_head} {sk1[k_head][0]:.3f}" if k_head in sk1 else "")
            + f"; exact influence function {f['influence function (exact H)']:.3f}.")
    reach = []
    for d in beds.values():  # where the default reaches tuned TRAK, and how far it stays from the exact IF
        c, (tv, _) = curve(d, m, label), best_trak(d)
        k_reach = min((k for k, v in c.items() if v >= tv), default=None)
        gap = flat(d)["influence function (exact H)"] - max(c.values())
        reach.append(f"{d['title']}: " + (f"from K = {k_reach}" if k_reach else f"not up to K = {max(c)}") + f" (IF still {gap:.2f} higher)")
    lines.append(f"* Limits: {m} at {label} reaches TRAK at its best λ on " + "; ".join(reach)
                 + ". No measure reaches the exact-Hessian influence function, which these small models allow.")
    for d in beds.values():  # a measure whose LDS falls as K grows is worth a warning
        for meas in ("whitened", "nystrom"):
            for lab in RATIOS:
                c = curve(d, meas, lab)
                if c and max(c.values()) - c[max(c)] > 0.05:
                    kbest = max(c, key=c.__getitem__)
                    lines.append(f"* {meas} at {lab} on {d['title']} falls as K grows: {c[kbest]:.3f} at K = {kbest}, "
                                 f"{c[max(c)]:.3f} at K = {max(c)}.")
    if poison:
        b = {row["method"]: row for row in poison["backdoor"][label]["rows"]}
        mm = {row["method"]: row for row in poison["mislabel"][label]["rows"]}
        kf = poison["mislabel"][label]["num_flipped"]
        lines.append(
            f"* Retrieval wants the normalised forms: backdoor P@10 at K = {poison['num_perturbations']}, {label}: "
            + ", ".join(f"{meas} {b[f'Daunce {meas}']['P@10']:.3f}" for meas in MEASURES if f"Daunce {meas}" in b)
            + f". Mislabel P@{kf}: " + ", ".join(f"{meth.replace('Daunce self-influence', 'self-influence')} {row[f'P@{kf}']:.3f}"
                                                 for meth, row in mm.items()) + ".")
    return "### Reading\n\n" + "\n".join(lines) + "\n"


def render_testbed(d: dict) -> str:
    s = d["settings"]
    f = flat(d)
    conv = s.get("daunce_convergence_median") or {}
    conv_txt = ", ".join(f"{lab}: {v:.2f}" for lab, v in conv.items() if v is not None)
    trak_v, trak_m = best_trak(d)
    return f"""### {d['title']}

{s['num_params']} parameters, {s['n_train']} train / {s['n_queries']} test examples, L2 penalty {s['weight_decay']}, test accuracy
{s['target_test_accuracy']:.3f}; S = {s['num_subsets']} retrained halves{'' if not s['if_damping'] else f"; the influence function adds {s['if_damping']}·I to the exact Hessian"}.
{d['elapsed_s']:.0f} s for this testbed ({d['date']}, code {d.get('code', 'unknown')}). Median convergence ratio of the perturbed fine-tunes
(|∇ objective| at the end / at θ0, `metadata["convergence"]`): {conv_txt or 'not recorded'}.

{pivot(d)}

{baselines_table(d)}

Best TRAK: {trak_v:.3f} ({trak_m}); exact influence function {f['influence function (exact H)']:.3f}.

![LDS vs K, {d['title']}]({TESTBEDS[d['testbed']]['plot']})
"""


def render_poison(p: dict) -> str:
    b0, b1 = p["backdoor"]["r=0.3"], p["backdoor"]["r=1.0"]
    m0, m1 = p["mislabel"]["r=0.3"], p["mislabel"]["r=1.0"]
    b1rows = {r["method"]: r for r in b1["rows"]}
    brows = [{"method": r["method"], "P@10 (r=0.3)": r["P@10"], "P@20 (r=0.3)": r["P@20"],
              "P@10 (r=1.0)": b1rows.get(r["method"], {}).get("P@10"), "P@20 (r=1.0)": b1rows.get(r["method"], {}).get("P@20")}
             for r in b0["rows"]]
    kf = m0["num_flipped"]
    m1rows = {r["method"]: r for r in m1["rows"]}
    mrows = [{"method": r["method"], f"P@{kf} (r=0.3)": r[f"P@{kf}"], f"R@{2 * kf} (r=0.3)": r[f"R@{2 * kf}"],
              f"P@{kf} (r=1.0)": m1rows[r["method"]][f"P@{kf}"], f"R@{2 * kf} (r=1.0)": m1rows[r["method"]][f"R@{2 * kf}"]}
             for r in m0["rows"]]
    return f"""### Backdoor retrieval

{b0['num_poisoned']} digits train images ({b0['random_precision']:.1%}) get a 4-pixel bar trigger on the (always blank) left edge
and label 0; the target logistic regression learns it (attack success on triggered test images {b0['attack_success']:.0%}, clean
test accuracy {b0['clean_accuracy']:.1%}). Queries: {b0['num_queries']} triggered test images of other digits, queried with label 0.
Precision@k of poisoned examples among each query's top-k proponents (mean over queries), K = {p['num_perturbations']};
random ranking expects {b0['random_precision']:.3f}; the gradient and influence-function baselines do not depend on r. Test: `tests/evaluation/test_poison.py` (K = 16: corr, whitened-corr
and nystrom-corr P@10 ≥ 0.4).

{md_table(brows, list(brows[0]))}

### Mislabel detection

{kf} digits train labels ({m0['random_precision']:.1%}) flipped to another class; the target is trained on the noisy labels.
Ranking by Daunce self-influence (`store.self_influence(measure=...)`: the variance of the loss for cov,
ū_iᵀ M ū_i for whitened and nystrom) over K = {p['num_perturbations']} perturbations, against ranking by the target model's
own loss; precision P in the top {kf} and recall R in the top {2 * kf}; random ranking expects P = {m0['random_precision']:.3f}.
Test: `tests/evaluation/test_poison.py` (K = 16, every measure: P@{kf} ≥ 0.6, R@{2 * kf} ≥ 0.8).

{md_table(mrows, list(mrows[0]))}

({p['elapsed_s']:.0f} s for the backdoor and mislabel runs.)
"""


def render(beds: dict[str, dict], poison: dict | None, command: str) -> str:
    any_bed = next(iter(beds.values()))
    rows, winners = worst_case(beds) if len(beds) > 1 else ([], {})
    total = sum(d["elapsed_s"] for d in beds.values()) + (poison["elapsed_s"] if poison else 0.0)
    parts = [f"""{SECTION}

Run: `{command}` ({total:.0f} s in all, one run per testbed) on {any_bed['machine']}; each testbed's date and code are in
its section. The raw numbers are in `bench/accuracy*.json`. Every Daunce LDS is computed with the
public `store.scores(query_set, measure=..., columns=positions)` on the columns one store holds, so all measures of a
testbed share their perturbations.

**Protocol.** LDS: S random 50 % subsets; the target is retrained on each with full-batch L-BFGS (deterministic; the
MLPs from θ0's own initialization) and every test query's **margin** (true logit − logsumexp of the others) is recorded.
A method's prediction for subset s is Σ_{{i∈D_s}} τ(i, j) with τ > 0 = proponent; LDS = mean over queries of the Spearman
correlation over subsets.

* Daunce: the runner (`run_worker`), IF objective, ρ = γ = 1, Adam lr 3e-3 with cosine decay, 20 epochs of batch 64
  over D_k, signal = loss, the target's own L2 penalty kept in the perturbed objective
  (`ClassificationTask(weight_decay=...)`), at subset ratio r = 0.3 (the paper's default) and r = 1.0. One store of
  {max(KS)} perturbations per r and testbed; a K cell is the mean ± std over up to 8 disjoint groups of K of its columns
  (positions), i.e. what one run at that K gets. Measures (DESIGN §1.1): cov, corr, whitened (M = (ŪᵀŪ + λI)⁻¹),
  nystrom (M = pinv(sym(W̄ᵀŪ)), eigenvalues floored at 3 % of the largest, W from each commit's recorded draw) and the
  normalised "-corr" forms.
* Influence function: the exact Hessian of the training objective (L2 penalty included), τ = ∇ℓ_jᵀ H⁻¹ ∇ℓ_i.
* TRAK: MadryLab's `traker` 0.3.2 on CPU (BasicProjector, Gaussian, fp32), M = 1 (the target) or M = 10 models
  trained on independent random halves, for λ (`lambda_reg`) ∈ {any_bed['settings']['trak_lambdas']} (picked on these
  same subsets: optimistic for TRAK); with proj_dim 2048, and with proj_dim = K (the sketch size Daunce has), λ
  tuned per K.
* "Daunce limit K→∞": what plain cov estimates when the fine-tunes reach their minimizers, g_iᵀH⁻¹FH⁻¹g_j (IF form),
  and g_iᵀF⁻¹g_j (Fisher form); Nyström's limit is the influence function itself.
"""]
    if rows:
        ks = [int(c[2:]) for c in rows[0] if c.startswith("K=")]
        win = "; ".join(f"K = {k}: **{m}, r = {r}** ({v:.3f})" for k, (m, r, v) in winners.items())
        parts.append(f"""### Which measure and r: the worst case over the {len(beds)} testbeds

Minimum LDS over {', '.join(d['title'] for d in beds.values())} for each measure and subset ratio
(the defaults are picked by this worst case, not by the best testbed; worst cases within {TIE} of the best, the seed
spread, are a tie that the mean over the testbeds breaks). Best worst case per K: {win}.

{md_table(rows, ['measure', 'r'] + [f'K={k}' for k in ks])}
""")
        parts.append(reading(beds, winners, poison))
    parts += [render_testbed(d) for d in beds.values()]
    if poison:
        parts.append(render_poison(poison))
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small S and K; prints, writes nothing")
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md and the plots from bench/accuracy*.json")
    ap.add_argument("--only", default="", help=f"comma-separated parts to recompute: {', '.join(TESTBEDS)}, poison (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*gradient norm of the perturbed objective.*")  # its ratios are in the JSON
    parts = [p for p in args.only.split(",") if p] or ([] if args.render else [*TESTBEDS, "poison"])
    for part in parts:
        if part not in (*TESTBEDS, "poison"):
            ap.error(f"unknown part {part!r}")
        t = time.perf_counter()
        result = compute_poison(args.quick) if part == "poison" else compute_testbed(part, args.quick)
        print(f"{part}: done in {time.perf_counter() - t:.0f}s", flush=True)
        if args.quick:
            print(json.dumps(result, indent=1, default=str)[:4000])
            continue
        (HERE / (POISON_JSON if part == "poison" else TESTBEDS[part]["json"])).write_text(json.dumps(result, indent=1, default=str))
    if args.quick:
        return
    beds = {n: json.loads((HERE / s["json"]).read_text()) for n, s in TESTBEDS.items() if (HERE / s["json"]).exists()}
    beds = {n: d for n, d in beds.items() if "testbed" in d}  # JSON files from before the three testbeds are skipped
    poison = json.loads((HERE / POISON_JSON).read_text()) if (HERE / POISON_JSON).exists() else None
    for d in beds.values():
        plot(d, HERE / TESTBEDS[d["testbed"]]["plot"])
    text = render(beds, poison, "python bench/lds.py")
    write_section(SECTION, text, HERE / "RESULTS.md")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
