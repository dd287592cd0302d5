"""Issue 25, part 1: the centred L2 term (``l2_center: theta0``) against the plain one (``zero``), with the
runner's own defaults (PerturbConfig(): IF form, r = 1.0, rho = gamma = 1, Adam lr 3e-3 cosine, 20 epochs of
batch 64), on the three small LDS testbeds of bench/lds.py.

Per testbed and objective: one store of K_max perturbations; for K in KS the LDS of each measure (mean over
disjoint groups of K columns), and the signals a measure choice could read from the store: the drift share
(daunce_store.scoring.drift_share), the asymmetry ‖B − Bᵀ‖/‖B + Bᵀ‖ of the centred B = W̄ᵀŪ and the share of
negative eigenvalues of its symmetric part (of the K − 1 outside the centring's null direction), each the
mean over the same groups. The exact-Hessian influence function is the reference.

    python bench/centred.py                  # K_max 128, writes bench/centred.json and the RESULTS.md section
    python bench/centred.py --kmax 64        # smaller
    python bench/centred.py --render         # only re-render RESULTS.md from bench/centred.json
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from _results import write_section  # bench/_results.py (the script's folder is on sys.path)
from lds import TESTBEDS, code_version, machine  # the testbeds of bench/lds.py, as they are

from daunce_store.evaluation import baselines
from daunce_store.evaluation._daunce import column_groups, fill_store
from daunce_store.evaluation._digits import DATASETS, fit, load_split, make_model, predict_logits
from daunce_store.evaluation.lds import lds, make_lds_benchmark
from daunce_store.perturb import PerturbConfig
from daunce_store.scoring import drift_share
from daunce_store.store import PerturbationDraw, weights_block

HERE = Path(__file__).resolve().parent
JSON = HERE / "centred.json"
SECTION = "## Centred L2 objective and the drift share (issue 25)"
MEASURES = ("nystrom", "whitened", "cov")
CENTERS = ("zero", "theta0")


def signals(store: Any, columns: list[int]) -> dict[str, float]:
    """Asymmetry and negative-eigenvalue share of the centred W̄ᵀŪ of these columns (dense: small n)."""
    snap = store.snapshot()
    slots = [snap.slots[p] for p in columns]
    losses = store.train_losses(snapshot=snap, slots=slots).astype(np.float64)
    u = losses - losses.mean(axis=1, keepdims=True)
    by_slot = {c.slot: c for c in snap.commits}
    draws = [PerturbationDraw.from_metadata(by_slot[s].metadata) for s in slots]
    w, members = weights_block(draws, 0, len(losses))
    b = (w.astype(np.float64).T @ u) / np.maximum(members, 1)[:, None]
    p = np.eye(len(b)) - 1.0 / len(b)
    b = p @ b @ p
    vals = np.linalg.eigvalsh(0.5 * (b + b.T))
    vals = np.delete(vals, np.argmin(np.abs(vals)))  # the centring's null direction
    return {"asymmetry": float(np.linalg.norm(b - b.T) / np.linalg.norm(b + b.T)),
            "negative_share": float(np.mean(vals < 0))}


SPREAD = 0.01  # LDS spread across store seeds and column groups on these testbeds (bench/RESULTS.md)


def run_testbed(name: str, kmax: int, ks: list[int], max_groups: int, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    spec = TESTBEDS[name]["kwargs"]
    dataset, kind = spec["dataset"], spec["model_kind"]
    data = load_split(dataset, seed=0)
    wd = DATASETS[dataset]["weight_decay"]
    torch.set_num_threads(1)
    t = time.perf_counter()
    target = fit(make_model(kind, num_features=data.num_features, num_classes=data.num_classes), data.x_train, data.y_train, weight_decay=wd)
    bench = make_lds_benchmark(data, num_subsets=spec["num_subsets"], model_kind=kind, weight_decay=wd, seed=1234)
    if_lds = float(np.nanmean(lds(baselines.influence_function_scores(
        target, data.x_train, data.y_train, data.x_test, data.y_test, weight_decay=wd, damping=spec.get("if_damping", 0.0)), bench)))
    out: dict[str, Any] = {"title": TESTBEDS[name]["title"], "num_subsets": spec["num_subsets"], "weight_decay": wd,
                           "n_train": len(data.y_train), "n_queries": len(data.y_test),
                           "test_accuracy": float((predict_logits(target, data.x_test).argmax(1) == data.y_test).mean()),
                           "if_lds": if_lds, "bench_seconds": round(time.perf_counter() - t, 1), "centers": {}}
    print(f"{name}: LDS benchmark and IF {out['bench_seconds']} s; IF LDS {if_lds:.3f}", flush=True)
    for center in CENTERS:
        config = PerturbConfig(l2_center=center, eval_batch_size=2048, **(changes or {}))  # the runner's defaults otherwise
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            torch.set_num_threads(1)
            store = fill_store(Path(tmp) / "s.zarr", target, data.x_train, data.y_train, {"test": (data.x_test, data.y_test)},
                               kmax, config=config, weight_decay=wd, progress=False)
            seconds = time.perf_counter() - t
            ratios = [c.metadata["convergence"]["ratio"] for c in store.commits()]
            rec: dict[str, Any] = {"seconds": round(seconds, 1), "convergence_median": float(np.median(ratios)),
                                   "drift_share": drift_share(store), "mean_change": float(np.mean(
                                       [c.metadata["train_change"]["mean"] for c in store.commits()])), "K": {}}
            for k in ks:
                groups = column_groups(store, "test", k, max_groups=max_groups)
                row: dict[str, Any] = {"groups": len(groups)}
                for measure in MEASURES:
                    vals = [float(np.nanmean(lds(store.scores("test", measure=measure, columns=g).to_numpy(), bench))) for g in groups]
                    row[measure] = float(np.mean(vals))
                    row[measure + "_std"] = float(np.std(vals))
                sig = [signals(store, g) for g in groups]
                row["asymmetry"] = float(np.mean([s["asymmetry"] for s in sig]))
                row["negative_share"] = float(np.mean([s["negative_share"] for s in sig]))
                row["drift_share"] = float(np.mean([drift_share(store, columns=g) for g in groups]))
                rec["K"][str(k)] = row
                print(f"  {center:<6} K={k:<4} " + " ".join(f"{m} {row[m]:.3f}" for m in MEASURES)
                      + f" drift {row['drift_share']:.3f} asym {row['asymmetry']:.3f} neg {row['negative_share']:.2f}", flush=True)
            out["centers"][center] = rec
            print(f"  {center}: {kmax} perturbations in {seconds:.0f} s, convergence median {rec['convergence_median']:.2f}, "
                  f"drift share (all K) {rec['drift_share']:.3f}", flush=True)
    return out


def render(result: dict[str, Any]) -> str:
    ks = result["ks"]
    beds = result["testbeds"]
    lines = [
        f"Latest run: `{result['command']}` ({result['seconds']:.0f} s in all; each testbed below names its own run) on {result['machine']}; {result['date']}; code "
        f"{result['code']}. Raw numbers: `bench/centred.json`.",
        "",
        "**Protocol.** The testbeds, targets and LDS ground truth of `bench/lds.py` (S retrained 50 % subsets, test margins, "
        "Spearman per query); Daunce with the runner's defaults, `PerturbConfig(l2_center=...)` (IF form, r = 1.0, ρ = γ = 1, "
        "Adam lr 3e-3 cosine, 20 epochs of batch 64, the target's λ), one store of K_max columns per objective; a K cell is "
        "the mean over disjoint groups of K columns. `zero`: λ/2‖θ‖² (the library's objective until now); `theta0`: "
        "λ/2‖θ−θ0‖². Drift share: K‖d̄‖²/‖D‖² of the train loss change D = L − L0 (`daunce_store.scoring.drift_share`). "
        "Asymmetry ‖B−Bᵀ‖/‖B+Bᵀ‖ and negative-eigenvalue share of sym(B), B = the centred W̄ᵀŪ (what nystrom inverts).",
        "",
    ]
    lines += ["### Default measure (nystrom): worst case over the testbeds", "",
              "| objective | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    worst = {}
    for center in CENTERS:
        worst[center] = [min(b["centers"][center]["K"][str(k)]["nystrom"] for b in beds.values()) for k in ks]
        lines.append(f"| `{center}` | " + " | ".join(f"{v:.3f}" for v in worst[center]) + " |")
    better = [k for k, a, b in zip(ks, worst["zero"], worst["theta0"]) if b > a + SPREAD]
    # The largest loss on one testbed from centring, and where: maximin alone would trade a large loss on one
    # testbed for a gain within the seed spread on another.
    losses = {(name, k): b["centers"]["zero"]["K"][str(k)]["nystrom"] - b["centers"]["theta0"]["K"][str(k)]["nystrom"]
              for name, b in beds.items() for k in ks}
    (lost_at, lost_k), lost = max(losses.items(), key=lambda kv: kv[1])
    gains = ", ".join(f"{b - a:+.3f}" for a, b in zip(worst["zero"], worst["theta0"]))
    switch = len(better) == len(ks) and lost <= SPREAD
    lines += ["", f"Worst case, `theta0` − `zero`: {gains} at K = {', '.join(map(str, ks))}; the largest loss on one testbed "
              f"is {lost:.3f} ({beds[lost_at]['title']}, K = {lost_k}). The rule: switch when the worst case improves by more "
              f"than the seed spread ({SPREAD}) at every K and no testbed loses more than it. "
              + ("**It becomes the default.**" if switch else "**The default stays `zero`.**"), ""]
    if result.get("variants"):
        lines += ["### Beside the defaults: other fine-tune settings", "",
                  "The same protocol with some `PerturbConfig` fields changed (the rest the runner's defaults); nystrom LDS, "
                  "and the drift share over all columns.", "",
                  "| testbed | changes | K | `zero` | `theta0` | drift `zero` | drift `theta0` | convergence `zero` / `theta0` | command, date |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in result["variants"]:
            z, c = v["centers"]["zero"], v["centers"]["theta0"]
            for k in v["ks"]:
                lines.append(f"| {v['title']} | `{json.dumps(v['changes'])}` | {k} | {z['K'][str(k)]['nystrom']:.3f} | "
                             f"{c['K'][str(k)]['nystrom']:.3f} | {z['drift_share']:.3f} | {c['drift_share']:.3f} | "
                             f"{z['convergence_median']:.2f} / {c['convergence_median']:.2f} | `{v['command']}`, {v['date']}, code {v['code']} |")
        lines.append("")
    for name, b in beds.items():
        run = b.get("run")
        lines += [f"### {b['title']}", "",
                  (f"Run: `{run['command']}`, {run['date']}, code {run['code']}. " if run else "")
                  + f"{b['n_train']} train / {b['n_queries']} test examples, λ = {b['weight_decay']}, target test accuracy "
                  f"{b['test_accuracy']:.3f}, S = {b['num_subsets']}; exact-Hessian influence function LDS **{b['if_lds']:.3f}**. "
                  + "; ".join(f"`{c}`: {r['seconds']:.0f} s for {result['kmax']} columns, median convergence ratio "
                              f"{r['convergence_median']:.2f}, mean train loss change {r['mean_change']:+.4f}, drift share over all "
                              f"{result['kmax']} columns {r['drift_share']:.3f}" for c, r in b["centers"].items()) + ".", "",
                  "| objective | K | " + " | ".join(MEASURES) + " | drift share | asymmetry | negative eig. share |",
                  "|---|---|" + "---|" * (len(MEASURES) + 3)]
        for center in CENTERS:
            for k in ks:
                row = b["centers"][center]["K"][str(k)]
                lines.append(f"| `{center}` | {k} | " + " | ".join(f"{row[m]:.3f} ± {row[m + '_std']:.3f}" for m in MEASURES)
                             + f" | {row['drift_share']:.3f} | {row['asymmetry']:.3f} | {row['negative_share']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kmax", type=int, default=128)
    ap.add_argument("--only", default=",".join(TESTBEDS), help="testbeds, comma-separated (lr, mlp, bc)")
    ap.add_argument("--max-groups", type=int, default=4)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--variant", default=None, help="JSON of PerturbConfig changes, e.g. '{\"epochs\": 60}': measured beside "
                    "the defaults (into variants in bench/centred.json), not as them")
    args = ap.parse_args()
    if args.render:
        result = json.loads(JSON.read_text())
    elif args.variant:
        changes = json.loads(args.variant)
        result = json.loads(JSON.read_text())
        ks = [k for k in (32, 64, 128, 256) if k <= args.kmax]
        for name in args.only.split(","):
            t = time.perf_counter()
            rec = run_testbed(name, args.kmax, ks, args.max_groups, changes)
            rec.update({"testbed": name, "changes": changes, "kmax": args.kmax, "ks": ks, "seconds": round(time.perf_counter() - t),
                        "command": "python bench/centred.py " + " ".join(sys.argv[1:]),
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "code": code_version()})
            result.setdefault("variants", []).append(rec)
            JSON.write_text(json.dumps(result, indent=1))
    else:
        ks = [k for k in (32, 64, 128, 256) if k <= args.kmax]
        t = time.perf_counter()
        result = json.loads(JSON.read_text()) if JSON.exists() else {}
        if result.get("kmax") != args.kmax:
            result = {}
        testbeds = result.get("testbeds", {})
        for name in args.only.split(","):
            testbeds[name] = run_testbed(name, args.kmax, ks, args.max_groups)
            testbeds[name]["run"] = {"command": "python bench/centred.py " + " ".join(sys.argv[1:]), "code": code_version(),
                                     "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            result.update({"kmax": args.kmax, "ks": ks, "testbeds": testbeds})
            JSON.write_text(json.dumps(result, indent=1))
        result.update({"command": "python bench/centred.py " + " ".join(sys.argv[1:]), "machine": machine(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "code": code_version(),
                       "seconds": result.get("seconds", 0.0) + time.perf_counter() - t})
        JSON.write_text(json.dumps(result, indent=1))
    if set(result["testbeds"]) == set(TESTBEDS):
        write_section(SECTION, SECTION + "\n\n" + render(result), HERE / "RESULTS.md")
    print(render(result))


if __name__ == "__main__":
    main()
