"""Perturbation-runner throughput: perturbations per hour and evaluation examples/s.

    python bench/perturb_throughput.py [--device cpu|cuda] [--precision fp32|bf16] [--smollm-k 2] [--digits-k 16]

Digits: logistic regression (650 parameters), 1437 train / 360 test, IF objective, 3 epochs over r = 0.3.
SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32 by transformers) with LoRA r=64 on the MLP
projections: `--smollm-steps` steps of batch 4 on chatterbot dialogues (sequences up to 40 tokens),
then evaluation of every train and query dialogue. Numbers come from each commit's metadata.
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
from daunce_store.demo_llm import load_dialogues, load_smollm2, prompt
from daunce_store.evaluation import fit, load_digits_split, make_model
from daunce_store.perturb import CausalLMTask, ClassificationTask, PerturbConfig, run_worker


def digits() -> tuple:
    """(model, task, train, queries, train ids, query ids): θ0 = L2-regularized logistic regression."""
    data = load_digits_split()
    model = fit(make_model("logreg"), data.x_train, data.y_train, weight_decay=1e-3)

    def dataset(x: np.ndarray, y: np.ndarray) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))

    return (model, ClassificationTask(weight_decay=1e-3), dataset(data.x_train, data.y_train),
            {"test": dataset(data.x_test, data.y_test)}, data.train_ids, data.test_ids)


def smollm2(n_train: int, n_query: int, max_length: int = 40) -> tuple:
    """(model, task, train items, query items): SmolLM2-135M-Instruct on chatterbot-corpus dialogues."""
    model, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = [CausalLMTask.encode(tok, prompt(u), f"{r}<|im_end|>", max_length=max_length)
             for _, u, r in load_dialogues()[: n_train + n_query]]
    return model, CausalLMTask(pad_token_id=pad, max_length=max_length), items[:n_train], {"test": items[n_train:]}


def _summary(name: str, commits: list, wall: float) -> dict:
    train = np.array([c.metadata["train_seconds"] for c in commits])
    ev = np.array([c.metadata["eval_seconds"] for c in commits])
    rate = np.array([c.metadata["eval_examples_per_second"] for c in commits])
    per = wall / len(commits)
    return {"model": name, "K": len(commits), "train_s_per_perturbation": float(np.median(train)),
            "eval_s_per_perturbation": float(np.median(ev)), "eval_examples_per_s": float(np.median(rate)),
            "wall_s_per_perturbation": round(per, 3), "perturbations_per_hour": round(3600 / per, 1),
            "device": commits[0].metadata["device"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--digits-k", type=int, default=16)
    ap.add_argument("--smollm-k", type=int, default=2)
    ap.add_argument("--smollm-steps", type=int, default=8)
    ap.add_argument("--smollm-train", type=int, default=64)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, task, train, queries, tid, qid = digits()
        store = daunce_store.init(Path(tmp) / "d.zarr", tid, {"test": qid}, chunk_rows=4096, capacity=512)
        cfg = PerturbConfig(ratio=0.3, epochs=3, lr=1e-2, batch_size=64, convergence_probe=0, eval_batch_size=2048, device=args.device, precision=args.precision)
        t = time.perf_counter()
        commits = run_worker(store, model, task, train, queries, cfg, until=args.digits_k, progress=False)
        rows.append(_summary("digits logreg", commits, time.perf_counter() - t))
        print(json.dumps(rows[-1]), flush=True)
        if args.smollm_k:
            model, task, train, queries = smollm2(n_train=args.smollm_train, n_query=16)
            store = daunce_store.init(Path(tmp) / "s.zarr", [f"t{i}" for i in range(len(train))],
                                      {"test": [f"q{j}" for j in range(len(queries["test"]))]}, chunk_rows=1024, capacity=64)
            cfg = PerturbConfig(ratio=0.5, max_steps=args.smollm_steps, batch_size=4, lr=3e-4, eval_batch_size=16,
                                lora={}, device=args.device, precision=args.precision)
            t = time.perf_counter()
            commits = run_worker(store, model, task, train, queries, cfg, until=args.smollm_k, progress=False)
            rows.append(_summary(f"SmolLM2-135M LoRA, {args.smollm_steps} steps x 4", commits, time.perf_counter() - t))
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
