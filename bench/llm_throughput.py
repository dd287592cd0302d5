"""LLM perturbation throughput, cached last-L-layers path against the full model, on SmolLM2-135M.

    python bench/llm_throughput.py [--n 48] [--steps 4] [--batch-size 8] [--layers 2 4] [--threads 2]

For each mode one real perturbation (IF objective, LoRA r = 16 on the MLPs of the last L layers, AdamW)
is run by the runner into a throwaway store on `--n` chatterbot dialogues (sequences up to 40 tokens),
and the commit's metadata gives the training and evaluation seconds:

* full:    the whole model (30 layers, head at every position), LoRA on the last L layers;
* cached:  LlamaTail(model, L) on hidden states cached once at layer 30 − L (head at reply tokens only).

Tokens/s count the sequence tokens of the examples trained on / evaluated. The projection to n = 10,000
examples uses 32 steps of 8 per perturbation, and for the cached path adds the one-time cache pass
(amortized over K = 100 perturbations).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import daunce_store
from daunce_store.demo_llm import encoder, load_dialogues, load_smollm2
from daunce_store.perturb import CausalLMTask, PerturbConfig, cached_lm, run_worker

PROJECT_N, PROJECT_STEPS, PROJECT_BATCH, PROJECT_K = 10_000, 32, 8, 100


def one_perturbation(model, task, items, config) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = daunce_store.init(Path(tmp) / "s.zarr", [f"t{i}" for i in range(len(items))], {}, capacity=2)
        (commit,) = run_worker(store, model, task, items, {}, config, until=1, progress=False)
    return commit.metadata


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    task = CausalLMTask(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, max_length=40)
    encode = encoder(tok, 40)
    items = [encode(u, r) for _, u, r in load_dialogues()[: args.n]]
    tokens = np.array([len(it["input_ids"]) for it in items])
    targets = np.array([sum(t != -100 for t in it["labels"][1:]) for it in items])
    mean_tokens = float(tokens.mean())
    print(f"{args.n} dialogues, {mean_tokens:.1f} tokens each on average ({targets.mean():.1f} reply tokens)")
    rows = []
    for layers in args.layers:
        config = PerturbConfig(objective="if", max_steps=args.steps, batch_size=args.batch_size, lr=1e-3, optimizer="adamw",
                               scheduler="constant", lora={"r": 16, "alpha": 16, "dropout": 0.0, "layers": layers},
                               eval_batch_size=32, convergence_probe=0)
        modes = []
        if not args.skip_full and layers == args.layers[0]:  # the full model's cost hardly depends on L
            modes.append(("full", lambda: (model, task, items, 0.0)))

        def cached(layers=layers):
            t = time.perf_counter()
            tail, ctask, ctrain, _ = cached_lm(model, task, items, None, layers)
            return tail, ctask, ctrain, (time.perf_counter() - t) / len(items)

        modes.append(("cached", cached))
        for mode, build in modes:
            m, t, data, cache_per_item = build()
            meta = one_perturbation(m, t, data, config.replace(lora={**config.lora, "layers": None}) if mode == "cached" else config)
            step_s = meta["train_seconds"] / args.steps
            eval_item_s = meta["eval_seconds"] / args.n
            per_pert = PROJECT_STEPS * step_s * PROJECT_BATCH / args.batch_size + PROJECT_N * eval_item_s
            per_pert += PROJECT_N * cache_per_item / PROJECT_K
            rows.append({
                "mode": mode, "layers": layers,
                "train_tokens_per_s": round(args.steps * args.batch_size * mean_tokens / meta["train_seconds"], 1),
                "eval_tokens_per_s": round(args.n * mean_tokens / meta["eval_seconds"], 1),
                "cache_tokens_per_s": round(mean_tokens / cache_per_item, 1) if cache_per_item else None,
                "projected_perturbations_per_hour_n10k": round(3600 / per_pert, 2),
            })
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
