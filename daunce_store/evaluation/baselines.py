"""Gradient-based attribution baselines on the same model: gradient dot product and cosine, an influence
function with the exact damped Hessian, and TRAK (MadryLab's ``traker`` package).

Every function returns a score matrix ``S`` of shape (n_train, m): ``S[i, j]`` is the influence of
train example i on query j with Daunce's sign convention: **positive = proponent**, i.e. training on i
(more) raises query j's margin / lowers its loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from daunce_store.errors import InvalidInputError

__all__ = [
    "per_example_grads",
    "grad_dot_scores",
    "grad_cosine_scores",
    "exact_hessian",
    "influence_function_scores",
    "trak_scores",
    "trak_scores_by_lambda",
]


def per_example_grads(model: Any, x: np.ndarray, y: np.ndarray, output: str = "loss") -> np.ndarray:
    """Per-example gradients (n, P), float64, of the cross-entropy (``output="loss"``) or of the margin
    (``output="margin"``: true logit minus logsumexp of the others) w.r.t. all parameters."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def value(p: dict[str, Any], xi: Any, onehot: Any) -> Any:
        # The label enters as a one-hot row: vmap cannot index with a batched tensor.
        logits = functional_call(model, p, (xi.unsqueeze(0),))[0]
        correct = (logits * onehot).sum()
        if output == "loss":
            return torch.logsumexp(logits, 0) - correct
        return correct - torch.logsumexp(torch.where(onehot > 0, -torch.inf, logits), 0)

    if output not in ("loss", "margin"):
        raise InvalidInputError(f"output must be 'loss' or 'margin', not {output!r}")
    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        n_out = model(xt[:1]).shape[1]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y, dtype=torch.int64), n_out).float()
    g = vmap(grad(value), in_dims=(None, 0, 0))(params, xt, onehot)
    return torch.cat([g[k].reshape(len(xt), -1) for k in params], dim=1).double().numpy()


def grad_dot_scores(model: Any, x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, y_query: np.ndarray) -> np.ndarray:
    """⟨∇ℓ_i, ∇ℓ_j⟩: one gradient step on i changes j's loss by −η⟨∇ℓ_j, ∇ℓ_i⟩, so positive = proponent."""
    return per_example_grads(model, x_train, y_train) @ per_example_grads(model, x_query, y_query).T


def grad_cosine_scores(model: Any, x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, y_query: np.ndarray) -> np.ndarray:
    """Cosine similarity of the loss gradients."""
    gt = per_example_grads(model, x_train, y_train)
    gq = per_example_grads(model, x_query, y_query)
    gt /= np.maximum(np.linalg.norm(gt, axis=1, keepdims=True), 1e-12)
    gq /= np.maximum(np.linalg.norm(gq, axis=1, keepdims=True), 1e-12)
    return gt @ gq.T


def exact_hessian(model: Any, x: np.ndarray, y: np.ndarray, weight_decay: float) -> np.ndarray:
    """The exact (P, P) Hessian, in float64, of the training objective that
    :func:`~daunce_store.evaluation.fit` minimizes, mean ℓ + (weight_decay/2)‖θ‖², at the model."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    model64 = copy.deepcopy(model).double()
    names = [k for k, _ in model64.named_parameters()]
    shapes = [v.shape for _, v in model64.named_parameters()]
    sizes = [v.numel() for _, v in model64.named_parameters()]
    flat0 = torch.cat([v.detach().reshape(-1) for _, v in model64.named_parameters()])
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)

    def objective(flat: Any) -> Any:
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return F.cross_entropy(functional_call(model64, params, (xt,)), yt) + 0.5 * weight_decay * (flat * flat).sum()

    return torch.autograd.functional.hessian(objective, flat0).numpy()


def influence_function_scores(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    *,
    weight_decay: float,
    damping: float = 0.0,
    output: str = "loss",
) -> np.ndarray:
    """Influence function with the exact Hessian H of the training objective (plus ``damping``·I):
    up-weighting i by ε moves θ by −ε H⁻¹∇ℓ_i and query j's loss by −ε ∇ℓ_jᵀ H⁻¹ ∇ℓ_i, so the
    proponent score is ∇ℓ_jᵀ H⁻¹ ∇ℓ_i (``output="margin"`` uses ∇margin_j instead, same sign)."""
    h = exact_hessian(model, x_train, y_train, weight_decay)
    h[np.diag_indices_from(h)] += damping
    gt = per_example_grads(model, x_train, y_train)
    # Up-weighting i by ε moves θ by Δθ = −ε H⁻¹ g_i. The query loss changes by ∇ℓ_jᵀΔθ, so the proponent
    # score (loss goes down) is +∇ℓ_jᵀ H⁻¹ g_i; its margin changes by ∇m_jᵀΔθ, proponent score −∇m_jᵀ H⁻¹ g_i.
    if output == "loss":
        gq = per_example_grads(model, x_query, y_query)
    elif output == "margin":
        gq = -per_example_grads(model, x_query, y_query, output="margin")
    else:
        raise InvalidInputError(f"output must be 'loss' or 'margin', not {output!r}")
    return gt @ np.linalg.solve(h, gq.T)


def trak_scores(models: Sequence[Any], *data: np.ndarray, lambda_reg: float = 0.0, **options: Any) -> np.ndarray:
    """TRAK scores from MadryLab's ``traker`` (CPU: its BasicProjector, Gaussian projections), ensembled
    over ``models`` (state dicts of one architecture, e.g. trained on different random halves of D);
    ``data`` = (x_train, y_train, x_query, y_query), ``options`` as :func:`trak_scores_by_lambda`'s.

    TRAK's formula: τ(j, i) = φ_j (ΦᵀΦ + λI)⁻¹ φ_iᵀ · (1 − p_i), φ = projected gradient of the margin
    log(p/(1 − p)), averaged over the ensemble; it predicts the change of the query's margin when i is in
    the training set, so positive = proponent.
    """
    return trak_scores_by_lambda(models, *data, lambdas=(lambda_reg,), **options)[float(lambda_reg)]


def trak_scores_by_lambda(
    models: Sequence[Any],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    *,
    proj_dim: int = 512,
    lambdas: Sequence[float] = (0.0,),
    batch_size: int = 256,
    seed: int = 0,
) -> dict[float, np.ndarray]:
    """:func:`trak_scores` for several ``lambda_reg`` values from one featurization: traker projects the
    gradients once, then each λ re-finalizes the features (Φ(ΦᵀΦ + λI)⁻¹) and re-scores the stored query
    features. Returns {λ: (n_train, m) scores}; ``seed`` seeds traker's projections."""
    try:
        import torch
        from trak import TRAKer
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise InvalidInputError("TRAK needs the `traker` package: pip install 'daunce-store[bench]'") from e

    if not models:
        raise InvalidInputError("trak_scores needs at least one model")
    if not lambdas:
        raise InvalidInputError("trak_scores_by_lambda needs at least one lambda")
    model = models[0]
    xt, yt = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.int64)
    xq, yq = torch.as_tensor(x_query, dtype=torch.float32), torch.as_tensor(y_query, dtype=torch.int64)
    out: dict[float, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=len(xt), save_dir=os.path.join(tmp, "trak"),
            device="cpu", proj_dim=proj_dim, use_half_precision=False, lambda_reg=float(lambdas[0]), logging_level=40,
            projector_seed=seed,
        )
        states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
        for mid, state in enumerate(states):
            traker.load_checkpoint(state, model_id=mid)
            for s in range(0, len(xt), batch_size):
                traker.featurize(batch=(xt[s : s + batch_size], yt[s : s + batch_size]), num_samples=len(xt[s : s + batch_size]))
        for i, lam in enumerate(lambdas):
            # A new λ: mark every model un-finalized so finalize_features recomputes Φ(ΦᵀΦ + λI)⁻¹ from the
            # stored projected gradients (traker keeps them), then score the stored query features again.
            traker.score_computer.lambda_reg = float(lam)
            for mid in range(len(states)):
                traker.saver.model_ids[mid]["is_finalized"] = 0
            if not getattr(traker.projector, "proj_matrix_available", True):
                traker.projector.proj_matrix = None  # finalize_features frees it again (`del`), which needs it to exist
            _quiet(traker.finalize_features)
            if i == 0:
                # finalize_features freed the projection matrix; with one block (proj_dim <= 100) traker's
                # BasicProjector only regenerates it on a change of model id, so force one.
                traker.projector.model_id = -1
                for mid, state in enumerate(states):
                    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=state, model_id=mid, num_targets=len(xq))
                    for s in range(0, len(xq), batch_size):
                        traker.score(batch=(xq[s : s + batch_size], yq[s : s + batch_size]), num_samples=len(xq[s : s + batch_size]))
            out[float(lam)] = np.array(_quiet(traker.finalize_scores, exp_name="queries"), dtype=np.float64)
    return out


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a traker call with its tqdm bars silenced."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)
