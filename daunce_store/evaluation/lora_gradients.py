"""Gradient baselines on LoRA parameters, for the LLM LDS (bench/llm_lds.py): a faithful LESS and a
LoGra-style influence function, scored on the same cached tail as Daunce.

- LESS (Xia et al., 2024): a LoRA warm-up run whose checkpoints keep their Adam state; each train example's
  gradient at a checkpoint becomes the Adam update it would cause (m̂/(√v̂+ε) after one more step), each query's
  stays a plain gradient; the score is Σ_checkpoints η_i · cos(query gradient, train update). LESS projects
  the gradients to 8192 dims to store them; here they are used whole (a projection only approximates this).
- LoGra-style IF (Choe et al., 2024): per-example gradients of fresh LoRA adapters on θ0 (B = 0, so the
  gradient lives in B: each weight gradient projected by the random A, LoGra's input-side projection),
  with a damped empirical Fisher as the curvature: g_qᵀ (GᵀG/n + λI)⁻¹ g_t, exact through Woodbury.

Scores are (queries × train), positive = training on the example lowers the query's loss.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

__all__ = ["adam_update", "fresh_lora", "less_adam_scores", "logra_scores", "lora_gradients", "train_lora"]

MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


def _on(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def fresh_lora(tail: Any, r: int, seed: int, *, in_place: bool = False) -> Any:
    """LoRA adapters (rank ``r``, initialised from ``seed``) on the MLPs of ``tail`` (a copy unless ``in_place``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tail if in_place else copy.deepcopy(tail),
                          LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=MLP_MODULES))


def train_lora(model: Any, task: Any, items: list[Any], *, epochs: int, lr: float, batch_size: int, seed: int,
               reporter: Any = None, after_epoch: Any = None) -> None:
    """AdamW (constant ``lr``, no weight decay) on ``model``'s trainable parameters, in a batch order fixed by
    ``seed``; ``after_epoch(optimizer)`` runs after each epoch, ``reporter`` (begun by the caller) per step."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(items))
        for s in range(0, len(order), batch_size):
            batch = _on(task.collate([items[i] for i in order[s : s + batch_size]]), model)
            loss = task.per_example_loss(task.outputs(model, batch), batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if reporter is not None:
                reporter.advance()
        if after_epoch is not None:
            after_epoch(opt)


def lora_gradients(model: Any, params: list[Any], task: Any, items: list[Any], *, normalize: bool,
                   update: Any = None, reporter: Any = None) -> np.ndarray:
    """One row per item: its loss gradient over ``params`` (flattened), mapped by ``update`` (e.g. to an Adam
    step) and scaled to unit norm when ``normalize``; ``reporter`` (begun by the caller) advances per item."""
    import torch

    out = np.empty((len(items), sum(p.numel() for p in params)), dtype=np.float32)
    for i, item in enumerate(items):
        batch = _on(task.collate([item]), model)
        loss = task.per_example_loss(task.outputs(model, batch), batch).sum()
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([(update(p, g) if update else g).flatten() for p, g in zip(params, grads)])
        if normalize:
            g = g / g.norm().clamp(min=1e-12)
        out[i] = g.float().cpu().numpy()
        if reporter is not None:
            reporter.advance()
    return out


def adam_update(opt: Any, p: Any, g: Any) -> Any:
    """The step direction Adam(W) would take on parameter ``p`` given gradient ``g`` next, from ``opt``'s state:
    m̂/(√v̂ + ε) after one more moment update (LESS's Γ; AdamW moves p by −lr times it, plus its decay)."""
    (beta1, beta2), eps = opt.defaults["betas"], opt.defaults["eps"]
    state = opt.state[p]
    step = int(state["step"]) + 1
    m = (beta1 * state["exp_avg"] + (1 - beta1) * g) / (1 - beta1**step)
    v = (beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g) / (1 - beta2**step)
    return m / (v.sqrt() + eps)


def less_adam_scores(tail: Any, task: Any, train: list[Any], queries: list[Any], *, epochs: int = 4, lr: float = 2e-3,
                     batch_size: int = 8, r: int = 16, seed: int = 0) -> np.ndarray:
    """LESS: a LoRA warm-up of ``epochs`` epochs on ``train`` (AdamW, constant ``lr``), a checkpoint after each
    epoch; at each, cos(query gradient, train example's Adam update) weighted by that epoch's learning rate."""
    model = fresh_lora(tail, r, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    total = np.zeros((len(queries), len(train)))

    def score_checkpoint(opt: Any) -> None:
        model.eval()
        q = lora_gradients(model, params, task, queries, normalize=True)
        t = lora_gradients(model, params, task, train, normalize=True,
                           update=lambda p, g: adam_update(opt, p, g))
        total[:] += lr * (q.astype(np.float64) @ t.T.astype(np.float64))

    train_lora(model, task, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, after_epoch=score_checkpoint)
    return total


def logra_scores(tail: Any, task: Any, train: list[Any], queries: list[Any], *, r: int = 16, seed: int = 0,
                 damping: float = 0.1) -> np.ndarray:
    """LoGra-style IF at θ0 = ``tail``: gradients in fresh LoRA B matrices (projected by the random A), curvature
    the empirical Fisher GᵀG/n damped by λ = ``damping`` × its mean nonzero eigenvalue."""
    model = fresh_lora(tail, r, seed)
    model.eval()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    gt = lora_gradients(model, params, task, train, normalize=False).astype(np.float64)
    gq = lora_gradients(model, params, task, queries, normalize=False).astype(np.float64)
    n = len(train)
    k_tt, k_qt = gt @ gt.T, gq @ gt.T
    lam = damping * np.trace(k_tt) / n / n
    # (GᵀG/n + λI)⁻¹ = (I − Gᵀ(nλI + GGᵀ)⁻¹G)/λ, so g_q(...)⁻¹G_tᵀ needs only n × n matrices.
    return (k_qt - k_qt @ np.linalg.solve(n * lam * np.eye(n) + k_tt, k_tt)) / lam
