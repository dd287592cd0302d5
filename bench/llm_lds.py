"""A small LDS on SmolLM2-135M: Daunce (cached last-L layers) against gradient baselines on the same LoRA
parameters: a faithful LESS (Adam-preconditioned train gradients at warm-up checkpoints), a LoGra-style
influence function, and the simplified LESS of earlier runs.

    python bench/llm_lds.py [--n 64] [--m 16] [--subsets 48] [-K 16 32 64 128] [--seeds 0 1] [--layers 2]
                            [--epochs 2] [--out bench/llm_lds.json]

The "training" under study is a LoRA fine-tune (r = 16 on the MLPs of the last L layers, fixed init and
batch order, `--epochs` epochs of batch 8, AdamW lr 2e-3) of SmolLM2-135M-Instruct on n chatterbot
dialogues; θ0 is that fine-tune on all n, merged. Ground truth: the same fine-tune from the same init on
S random halves, each query dialogue's reply loss measured after it. LDS: Spearman, over the S halves,
between the measured query loss (negated) and the sum of each method's scores over the half, averaged over
the m held-out queries (daunce_store.evaluation.lds). Daunce: IF objective around θ0, 16 steps of 8
per perturbation, one store per ``--seeds`` seed (different draws), measures nystrom, whitened (what columns
without recorded draws, e.g. black-box ones, get), cov and nystrom-corr. Everything runs on the cached
hidden states at layer 30 − L. Rows are printed and written to ``--out`` as they land.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import daunce_store
from daunce_store.demo_llm import encoder, load_dialogues, load_smollm2
from daunce_store.evaluation.lds import LDSBenchmark, lds
from daunce_store.evaluation.llm_backdoor import default_perturb_config, fit_lora, less_scores
from daunce_store.evaluation.lora_gradients import less_adam_scores, logra_scores
from daunce_store.perturb import CausalLMTask, LlamaTail, NullReporter, cached_lm, evaluate_signal, run_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=48)
    ap.add_argument("-K", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="Daunce stores' seeds (none: the baselines only)")
    ap.add_argument("--logra-damping", type=float, nargs="+", default=[10.0],
                    help="LoGra's damping, as a multiple of its Fisher's mean nonzero eigenvalue (one row each; 10 was the "
                         "best of 0.001 ... 100 here, bench/RESULTS.md)")
    ap.add_argument("--measures", nargs="+", default=["nystrom", "whitened", "cov", "nystrom-corr"])
    ap.add_argument("--objective", default="if", help="the perturbation's objective: if, or blackbox (fine-tunes on random "
                    "halves, as a fine-tuning API would run them; their subsets are recorded, so nystrom applies)")
    ap.add_argument("--l2-center", default="zero", help="the perturbed objective's L2 centre (zero | theta0)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("llm_lds.json"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_smollm2()
    task = CausalLMTask(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, max_length=40)
    encode = encoder(tok, 40)
    pairs = [(u, r) for _, u, r in load_dialogues()]
    order = np.random.default_rng(0).permutation(len(pairs))
    train = [encode(*pairs[i]) for i in order[: args.n]]
    queries = [encode(*pairs[i]) for i in order[args.n : args.n + args.m]]
    tail0, ctask, ctrain, cq = cached_lm(model, task, train, {"q": queries}, args.layers)
    cquery = cq["q"]
    tail0 = copy.deepcopy(tail0)  # the pretrained last L layers; every fine-tune starts from them
    eval_cfg = default_perturb_config()

    def fine_tune(rows: np.ndarray) -> LlamaTail:
        return fit_lora(copy.deepcopy(tail0), ctask, [ctrain[i] for i in rows], epochs=args.epochs, lr=2e-3, batch_size=8,
                        r=16, seed=0, reporter=NullReporter())

    t = time.perf_counter()
    rng = np.random.default_rng(1234)
    masks = np.zeros((args.subsets, args.n), dtype=bool)
    outputs = np.zeros((args.subsets, args.m))
    for s in range(args.subsets):
        masks[s, rng.choice(args.n, size=args.n // 2, replace=False)] = True
        outputs[s] = evaluate_signal(fine_tune(np.flatnonzero(masks[s])), ctask, cquery, eval_cfg)
    bench = LDSBenchmark(masks, outputs, "loss", 1)
    t_truth = time.perf_counter() - t
    print(f"ground truth: {args.subsets} halves in {t_truth:.0f} s; per-query std of the measured loss over halves "
          f"{np.median(outputs.std(axis=0)):.4f} (median)", flush=True)

    theta0 = fine_tune(np.arange(args.n))
    rows: list[dict] = []

    def record(method: str, k: int | None, seed: int | None, scores: np.ndarray, started: float) -> None:
        rows.append({"method": method, "K": k, "seed": seed, "lds": round(float(np.nanmean(lds(scores, bench))), 4),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}, indent=1))

    # LESS warms its own LoRA up from the pretrained tail (as the training does); the other two work at θ0.
    baselines = {
        "LESS (warm-up checkpoints, Adam-preconditioned)": lambda: less_adam_scores(tail0, ctask, ctrain, cquery),
        **{f"LoGra-style IF (LoRA-B gradients, damped Fisher, damping {d:g})":
           (lambda d=d: logra_scores(theta0, ctask, ctrain, cquery, damping=d)) for d in args.logra_damping},
        "LESS-style, simplified (LoRA-B gradient cosine at θ0)": lambda: less_scores(theta0, ctask, ctrain, cquery),
    }
    for method, scores_of in baselines.items():
        t = time.perf_counter()
        record(method, None, None, scores_of().T, t)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            path = Path(tmp) / f"lds-{seed}.zarr"
            store = daunce_store.init(path, [f"t{i}" for i in range(args.n)], {"q": [f"q{j}" for j in range(args.m)]},
                                      capacity=max(args.K), seed=seed)
            t = time.perf_counter()
            for k in sorted(args.K):
                run_worker(store, theta0, ctask, ctrain, {"q": cquery}, default_perturb_config(args.objective, l2_center=args.l2_center),
                           until=k, progress=False)
                for measure in args.measures:
                    scores = daunce_store.open(path).scores("q", measure=measure, columns=list(range(k))).to_numpy()
                    centred = "" if args.l2_center == "zero" else f", L2 centred on {args.l2_center}"
                    record(f"Daunce {args.objective.upper() if args.objective == 'if' else args.objective} ({measure}{centred})",
                           k, seed, scores, t)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
