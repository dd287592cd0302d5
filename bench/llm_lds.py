"""A small LDS on SmolLM2-135M: Daunce (cached last-L layers) against the LESS-style gradient baseline.

    python bench/llm_lds.py [--n 64] [--m 16] [--subsets 24] [-K 16 32] [--layers 2] [--epochs 2]

The "training" under study is a LoRA fine-tune (r = 16 on the MLPs of the last L layers, fixed init and
batch order, `--epochs` epochs of batch 8, AdamW lr 2e-3) of SmolLM2-135M-Instruct on n chatterbot
dialogues; θ0 is that fine-tune on all n, merged. Ground truth: the same fine-tune from the same init on
S random halves, each query dialogue's reply loss measured after it. LDS: Spearman, over the S halves,
between the measured query loss (negated) and the sum of each method's scores over the half, averaged over
the m held-out queries (daunce_store.evaluation.lds). Daunce: IF objective around θ0, 16 steps of 8
per perturbation, measures nystrom and cov. Everything runs on the cached hidden states at layer 30 − L.
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
from daunce_store.perturb import CausalLMTask, LlamaTail, NullReporter, cached_lm, evaluate_signal, run_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=24)
    ap.add_argument("-K", type=int, nargs="+", default=[16, 32])
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = daunce_store.init(Path(tmp) / "lds.zarr", [f"t{i}" for i in range(args.n)], {"q": [f"q{j}" for j in range(args.m)]},
                                  capacity=max(args.K))
        t = time.perf_counter()
        for k in sorted(args.K):
            run_worker(store, theta0, ctask, ctrain, {"q": cquery}, default_perturb_config(), until=k, progress=False)
            for measure in ("nystrom", "cov", "nystrom-corr"):
                scores = daunce_store.open(Path(tmp) / "lds.zarr").scores("q", measure=measure, columns=list(range(k))).to_numpy()
                rows.append({"method": f"Daunce IF ({measure})", "K": k, "lds": float(np.nanmean(lds(scores, bench))),
                             "seconds": round(time.perf_counter() - t, 1)})
                print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    less = less_scores(theta0, ctask, ctrain, cquery).T
    rows.append({"method": "LESS (LoRA gradient cosine)", "K": None, "lds": float(np.nanmean(lds(less, bench))),
                 "seconds": round(time.perf_counter() - t, 1)})
    print(json.dumps(rows[-1]), flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
