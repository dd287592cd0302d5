"""The Daunce perturbed objective (DESIGN §1), written in output space.

Per batch B of the random subset D_k::

    IF:      gamma * mean_i [l_i(theta) - l_i(theta0)]    - mean_i c_ik <f_theta(x_i) - f_theta0(x_i), dl_i/df|theta0>
             c_ik = 1 + rho (2 xi_ik - 1)
    Fisher:  gamma * mean_i [l_i(theta) - l_i(theta0)]^2  - mean_i c_ik <...>,   c_ik = rho (2 xi_ik - 1)
    blackbox: mean_i l_i(theta)   (plain fine-tuning on D_k)

The inner product's gradient is J_i(theta)^T dl_i/df|theta0, which at theta = theta0 is the per-example
parameter gradient: so the objective's gradient at theta0 is mean_i (gamma - c_ik) grad l_i (IF) and
-mean_i c_ik grad l_i (Fisher), a randomly reweighted loss, without any per-example parameter gradient.

The runner adds the target's own regulariser, lambda/2 ||theta||^2 over the trainable parameters
(:func:`l2_penalty`), to every form: theta0 minimised mean loss + lambda/2 ||theta||^2, and without the term
the perturbed fine-tune would drift away from theta0 along the regulariser's gradient (DESIGN §1.1). Its
gradient at theta0, lambda theta0, is the same for every perturbation k, so to first order it shifts all
columns alike and leaves the centered columns the estimators use unchanged; what it changes is the
curvature, H + lambda I, which is the curvature the target was trained with.

The weights c_ik come from :class:`daunce_store.store.PerturbationDraw` (``perturbation_weights`` is
re-exported here for the public name ``daunce_store.perturb.perturbation_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from daunce_store.errors import InvalidInputError
from daunce_store.store import perturbation_weights

__all__ = ["perturbation_weights", "reference_terms", "perturbed_objective", "batch_objective", "l2_penalty"]


def l2_penalty(params: Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor | float:
    """lambda/2 * sum_p ||p||^2 (accumulated in float32 or wider): the target's regulariser. 0.0 when lambda = 0."""
    if not weight_decay:
        return 0.0
    return 0.5 * float(weight_decay) * sum(_upcast(p).pow(2).sum() for p in params)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (bf16 autocast) are compared in float32; float32/64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reference_terms(task: Any, outputs0: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From theta0's outputs: (f_theta0, l_i(theta0), dl_i/df at theta0), all detached.

    ``dl_i/df`` is one backward pass through the loss head only: the loss of example i depends on its own
    outputs alone, so the gradient of the summed loss w.r.t. the outputs holds every example's gradient.
    """
    with torch.enable_grad():
        f0 = _upcast(outputs0.detach()).requires_grad_(True)
        loss0 = task.per_example_loss(f0, batch)
        (grad0,) = torch.autograd.grad(loss0.sum(), f0)
    return f0.detach(), loss0.detach(), grad0.detach()


def perturbed_objective(
    objective: str,
    losses: torch.Tensor,
    outputs: torch.Tensor,
    c: torch.Tensor,
    losses0: torch.Tensor | None = None,
    outputs0: torch.Tensor | None = None,
    grad0: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """The scalar objective of one batch (see the module docstring)."""
    if objective == "blackbox":
        return losses.mean()
    assert losses0 is not None and outputs0 is not None and grad0 is not None
    delta = losses - losses0
    first = delta.mean() if objective == "if" else (delta**2).mean()
    # <f_theta(x_i) - f_theta0(x_i), dl_i/df|theta0>, summed over every output coordinate of example i.
    inner = ((_upcast(outputs) - outputs0) * grad0).flatten(1).sum(1)
    return gamma * first - (c.to(inner.dtype) * inner).mean()


def batch_objective(
    task: Any,
    model: torch.nn.Module,
    batch: Any,
    c: torch.Tensor,
    objective: str,
    gamma: float,
    reference: Callable[[Any], torch.Tensor] | None,
) -> torch.Tensor:
    """Forward ``model`` on ``batch`` and return the perturbed objective.

    ``reference(batch)`` returns theta0's outputs (a frozen copy, the same model with its adapters
    disabled, or a cache); it is not called for the black-box form.
    """
    outputs = task.outputs(model, batch)
    losses = task.per_example_loss(outputs, batch)
    if objective == "blackbox":
        return perturbed_objective(objective, losses, outputs, c)
    if reference is None:
        raise InvalidInputError(f"the {objective!r} objective needs theta0's outputs (a reference function)")
    with torch.no_grad():
        outputs0 = reference(batch)
    f0, loss0, grad0 = reference_terms(task, outputs0, batch)
    return perturbed_objective(objective, losses, outputs, c, loss0, f0, grad0, gamma)
