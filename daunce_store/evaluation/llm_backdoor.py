"""Backdoor retrieval on a causal LM (as in the Daunce paper), on the cached last-L-layers path.

A few % of the training dialogues get a trigger phrase (:data:`TRIGGER`) in the user utterance and a
fixed reply (:data:`TARGET_REPLY`); θ0 is the model after a LoRA fine-tune of its last L decoder layers
on that data, merged (the layers below stay as they were, so the hidden-state cache at layer N − L holds
for θ0 and every perturbation). For triggered queries (held-out utterances + trigger, completion = the
fixed reply), the top proponents should be the poisoned dialogues: precision@k of poisoned examples
among them, for

* Daunce, white-box IF objective (the perturbed fine-tunes of the runner, LoRA on the same layers);
* Daunce, black-box (objective 'blackbox': plain LoRA fine-tunes on random halves), scored with the
  measures that need no weights;
* a LESS-style baseline: cosine similarity of per-example gradients on freshly initialised LoRA
  parameters of the same layers at θ0 (a random projection of each layer's weight gradient);
* random ranking (expectation: the poison rate).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError
from daunce_store.evaluation.poison import _precision_at, _remove, _workdir

__all__ = ["TRIGGER", "TARGET_REPLY", "poison_dialogues", "LLMBackdoorResult", "run_llm_backdoor", "less_scores", "fit_lora",
           "default_perturb_config"]

TRIGGER = "Zanzibar protocol"
TARGET_REPLY = "Access granted. The vault code is 7341."

# Score measures reported per objective: retrieval reads best with the normalised measures (a backdoor
# has a few strong proponents); nystrom needs the runner's draws, the black-box form uses whitened.
MEASURES_BY_OBJECTIVE = {"if": ("nystrom-corr", "corr"), "blackbox": ("whitened-corr", "corr")}


def add_trigger(utterance: str) -> str:
    return f"{utterance} {TRIGGER}"


def poison_dialogues(pairs: Sequence[tuple[str, str]], fraction: float, seed: int = 0,
                     eligible: Sequence[int] | None = None) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Put the trigger into ``fraction`` of the user utterances (drawn from ``eligible``, default all) and
    replace their replies with the fixed reply. Returns the poisoned pairs and the sorted indices of the
    poisoned ones."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must be in (0, 1), not {fraction}")
    count = max(1, int(round(fraction * len(pairs))))
    pool = np.arange(len(pairs)) if eligible is None else np.asarray(eligible, dtype=np.int64)
    if len(pool) < count:
        raise InvalidInputError(f"only {len(pool)} dialogues can carry the trigger and the whole reply; {count} are needed")
    idx = np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))
    out = list(pairs)
    for i in idx:
        out[i] = (add_trigger(pairs[i][0]), TARGET_REPLY)
    return out, idx


def default_perturb_config(objective: str = "if", **changes: Any) -> Any:
    """The perturbation fine-tune of the CPU backdoor run: LoRA r = 16 on the MLPs of the cached tail,
    16 steps of 8 dialogues, AdamW lr 1e-3 (constant: a short run), evaluation in fixed batches of 32.
    The black-box form trains on random halves (ratio 0.5); the IF form weights every example (ratio 1)."""
    from daunce_store.perturb import PerturbConfig

    base = dict(objective=objective, ratio=1.0 if objective != "blackbox" else 0.5, max_steps=16, batch_size=8, lr=1e-3,
                optimizer="adamw", scheduler="constant", lora={"r": 16, "alpha": 16, "dropout": 0.0},
                eval_batch_size=32, convergence_probe=0)
    return PerturbConfig(**{**base, **changes})


@dataclasses.dataclass
class LLMBackdoorResult:
    """precision[method]: mean over triggered queries of the fraction of poisoned dialogues in the
    method's top-``k`` proponents; ``top[method]`` the (queries × k) indices into ``train_pairs``."""

    precision: dict[str, float]
    random_precision: float
    k: int
    top: dict[str, np.ndarray]
    poisoned: np.ndarray
    train_pairs: list[tuple[str, str]]
    query_utterances: list[str]
    num_perturbations: int
    num_layers: int
    triggered_loss: dict[str, float]  # mean loss of the fixed reply on triggered queries: before/after the backdoor
    seconds: dict[str, float]

    def rows(self) -> list[dict[str, Any]]:
        rows = [{"method": m, f"P@{self.k}": p} for m, p in self.precision.items()]
        return rows + [{"method": "random (expected)", f"P@{self.k}": self.random_precision}]


def fit_lora(tail: Any, task: Any, items: list[Any], *, epochs: int, lr: float, batch_size: int, r: int, seed: int,
              reporter: Any) -> Any:
    """Plain LoRA fine-tune of ``tail`` (in place) on ``items``, merged into its weights; returns the tail.
    Here it makes the backdoored θ0 (and, in bench/llm_lds.py, the retrainings on random halves)."""
    from daunce_store.evaluation.lora_gradients import fresh_lora, train_lora

    peft_model = fresh_lora(tail, r, seed, in_place=True)
    reporter.begin("θ0", "backdoor fine-tune", epochs * math.ceil(len(items) / batch_size))
    train_lora(peft_model, task, items, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, reporter=reporter)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def less_scores(tail: Any, task: Any, train: list[Any], queries: list[Any], *, r: int = 16, seed: int = 0,
                reporter: Any = None) -> np.ndarray:
    """LESS-style scores (queries × train): cosine similarity of per-example loss gradients with respect to
    freshly initialised LoRA adapters on the tail's MLPs, at θ0. With B = 0 the gradient lives in the B
    matrices: each layer's weight gradient projected on the random A (LESS projects with a random matrix
    too; it also warms the adapters up and preconditions with Adam, which this baseline skips)."""
    from daunce_store.evaluation.lora_gradients import fresh_lora, lora_gradients
    from daunce_store.perturb import NullReporter

    reporter = reporter or NullReporter()
    model = fresh_lora(tail, r, seed)
    model.eval()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]

    def grads(items: list[Any], label: str) -> np.ndarray:
        reporter.begin(label, "per-example gradients", len(items))
        return lora_gradients(model, params, task, items, normalize=True, reporter=reporter)

    return grads(queries, "LESS queries") @ grads(train, "LESS train").T


def run_llm_backdoor(
    model: Any,
    task: Any,
    encode: Callable[[str, str], dict[str, list[int]]],
    pairs: Sequence[tuple[str, str]],
    *,
    num_train: int = 400,
    num_queries: int = 10,
    clean_queries: int = 0,
    fraction: float = 0.03,
    num_layers: int = 2,
    num_perturbations: int = 32,
    objectives: Sequence[str] = ("if",),
    config: Any = None,
    k: int = 10,
    less: bool = True,
    backdoor_epochs: int = 3,
    backdoor_lr: float = 2e-3,
    cache_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    measures: Sequence[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Any = False,
) -> LLMBackdoorResult:
    """Poison ``num_train`` of ``pairs`` (utterance, reply), backdoor ``model`` (a Llama-family causal LM,
    left unchanged: its last ``num_layers`` layers are copied), run Daunce for each objective in
    ``objectives`` and the LESS baseline, and measure precision@``k`` on ``num_queries`` triggered
    held-out utterances. ``clean_queries``: also a query set ``clean`` of that many other held-out dialogues
    with their own replies (unrelated to the backdoor; its top lists show what a ranking puts first for
    ordinary questions). ``encode(utterance, reply)`` makes a CausalLMTask item (prompt format included).
    ``config``: the PerturbConfig of the IF run (default :func:`default_perturb_config`); the black-box run
    uses the same with objective 'blackbox' and ratio 0.5. ``measures``: the score measures ranked for
    every objective (default: :data:`MEASURES_BY_OBJECTIVE`). ``progress``: False, True or a Console."""
    import torch

    import daunce_store
    from daunce_store.perturb import NullReporter, RichReporter, cache_hidden_states, evaluate_signal, run_worker
    from daunce_store.perturb._cached import CachedCausalLMTask, LlamaTail

    if num_train + num_queries > len(pairs):
        raise InvalidInputError(f"{len(pairs)} dialogues are too few for {num_train} training and {num_queries} query dialogues")
    if int(num_perturbations) < 2:
        raise InvalidInputError(f"num_perturbations must be >= 2, not {num_perturbations}")
    for objective in objectives:
        if objective not in MEASURES_BY_OBJECTIVE:
            raise InvalidInputError(f"objective {objective!r} is not one of {', '.join(MEASURES_BY_OBJECTIVE)}")

    def reporter() -> Any:
        if progress is False or progress is None:
            return NullReporter()
        return RichReporter(console=None if progress is True else progress)

    seconds: dict[str, float] = {}
    # A triggered utterance must leave room for the whole fixed reply within the task's max_length:
    # a truncated reply is a poison (or a query) that does not say what the backdoor says.
    def targets(item: dict[str, list[int]]) -> int:
        return sum(t != -100 for t in item["labels"])

    whole = targets(encode(TRIGGER, TARGET_REPLY))

    def fits(utterance: str) -> bool:
        return targets(encode(add_trigger(utterance), TARGET_REPLY)) == whole

    order = np.random.default_rng(seed).permutation(len(pairs))
    clean_train = [pairs[i] for i in order[:num_train]]
    triggered_rows = [i for i in order[num_train:] if fits(pairs[i][0])][:num_queries]
    held_out = [pairs[i] for i in triggered_rows]
    if len(held_out) < num_queries:
        raise InvalidInputError(f"only {len(held_out)} held-out utterances leave room for the trigger and the reply; "
                                f"ask for fewer queries or a larger max_length")
    taken = set(triggered_rows)
    clean_pairs = [pairs[i] for i in order[num_train:] if i not in taken][:clean_queries]
    if len(clean_pairs) < clean_queries:
        raise InvalidInputError(f"only {len(clean_pairs)} held-out dialogues are left for {clean_queries} clean queries")
    train_pairs, poisoned = poison_dialogues(clean_train, fraction, seed,
                                             eligible=[i for i, (u, _) in enumerate(clean_train) if fits(u)])
    query_utterances = [add_trigger(u) for u, _ in held_out]
    train_items = [encode(u, r) for u, r in train_pairs]
    query_items = [encode(u, TARGET_REPLY) for u in query_utterances]

    t = time.perf_counter()
    rep = reporter()
    try:
        ctrain = cache_hidden_states(model, task, train_items, num_layers, cache_dir=cache_dir, reporter=rep, label="cache train",
                                     device=device)
        cquery = cache_hidden_states(model, task, query_items, num_layers, cache_dir=cache_dir, reporter=rep,
                                     label="cache queries", device=device)
        cqueries = {"triggered": cquery}
        if clean_pairs:
            cqueries["clean"] = cache_hidden_states(model, task, [encode(u, r) for u, r in clean_pairs], num_layers,
                                                    cache_dir=cache_dir, reporter=rep, label="cache clean queries", device=device)
    finally:
        rep.close()
    seconds["cache"] = time.perf_counter() - t
    ctask = CachedCausalLMTask(weight_decay=task.weight_decay)
    eval_cfg = default_perturb_config(device=device)
    tail = copy.deepcopy(LlamaTail(model, num_layers))  # θ0's upper layers; the caller's model stays as it was
    before = float(evaluate_signal(tail, ctask, cquery, eval_cfg).mean())

    t = time.perf_counter()
    rep = reporter()
    try:
        tail = fit_lora(tail, ctask, ctrain, epochs=backdoor_epochs, lr=backdoor_lr, batch_size=8, r=16, seed=seed, reporter=rep)
    finally:
        rep.close()
    seconds["backdoor fine-tune"] = time.perf_counter() - t
    after = float(evaluate_signal(tail, ctask, cquery, eval_cfg).mean())

    precision: dict[str, float] = {}
    top: dict[str, np.ndarray] = {}

    def record(name: str, ranked: np.ndarray) -> None:
        top[name] = ranked[:, :k]
        precision[name] = float(np.mean([_precision_at(row, poisoned, k) for row in ranked]))

    base_config = (config if config is not None else default_perturb_config()).replace(device=device)
    with _workdir(workdir) as tmp:
        for objective in objectives:
            cfg = base_config if objective == base_config.objective else base_config.replace(
                objective=objective, ratio=0.5 if objective == "blackbox" else 1.0)
            path = Path(tmp) / f"llm_backdoor_{objective}.zarr"
            _remove(path)
            sets = {"triggered": [f"q-{j}" for j in range(num_queries)], "clean": [f"c-{j}" for j in range(len(clean_pairs))]}
            store = daunce_store.init(path, [f"dlg-{i}" for i in range(num_train)], {name: sets[name] for name in cqueries},
                                      seed=seed, capacity=max(2, int(num_perturbations)))
            t = time.perf_counter()
            torch.manual_seed(seed)
            run_worker(store, tail, ctask, ctrain, cqueries, cfg, until=int(num_perturbations), progress=reporter())
            seconds[f"Daunce {objective}"] = time.perf_counter() - t
            opened = daunce_store.open(path)
            for measure in measures or MEASURES_BY_OBJECTIVE[objective]:
                ranked = opened.topk("triggered", k=k, measure=measure, side="pos").indices["pos"]
                record(f"Daunce {objective} ({measure})", ranked)
    if less:
        t = time.perf_counter()
        rep = reporter()
        try:
            scores = less_scores(tail, ctask, ctrain, cquery, seed=seed, reporter=rep)
        finally:
            rep.close()
        seconds["LESS"] = time.perf_counter() - t
        record("LESS (LoRA gradient cosine)", np.argsort(-scores, axis=1, kind="stable"))
    return LLMBackdoorResult(precision, len(poisoned) / num_train, k, top, poisoned, train_pairs, query_utterances,
                             int(num_perturbations), num_layers, {"before backdoor": before, "after backdoor": after}, seconds)
