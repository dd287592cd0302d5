"""The Daunce perturbed objective (DESIGN §1), written in output space.

Per batch B of the random subset D_k::

    IF:      gamma * mean_i [l_i(theta) - l_i(theta0)]    - mean_i c_ik <f_theta(x_i) - f_theta0(x_i), dl_i/df|theta0>
             c_ik = 1 + rho (2 xi_ik - 1)
    Fisher:  gamma * mean_i [l_i(theta) - l_i(theta0)]^2  - mean_i c_ik <...>,   c_ik = rho (2 xi_ik - 1)
    blackbox: mean_i l_i(theta)   (plain fine-tuning on D_k)
    reweighted: mean_i (2 - c_ik) l_i(theta),   c_ik as for IF (gamma = 1)

The inner product's gradient is J_i(theta)^T dl_i/df|theta0, which at theta = theta0 is the per-example
parameter gradient: so the objective's gradient at theta0 is mean_i (gamma - c_ik) grad l_i (IF) and
-mean_i c_ik grad l_i (Fisher), a randomly reweighted loss, without any per-example parameter gradient.

The reweighted form fine-tunes that reweighted loss itself: the same gradient at theta0 as the IF form at
gamma = 1 (with r = 1), but its curvature is the full Hessian H + lambda, where the IF form's is the
Gauss-Newton GGN + lambda (it drops the model's own curvature N = H - GGN; docs/objectives.md). It needs no
reference outputs, like the black-box form.

The runner adds an L2 term over the trainable parameters to every form (:func:`l2_penalty`), centred where
``PerturbConfig.l2_center`` says:

* ``zero``: lambda/2 ||theta||^2, the target's own regulariser (theta0 minimised mean loss + lambda/2
  ||theta||^2). Its gradient at theta0, lambda theta0, is not cancelled by the perturbed data term (whose
  unperturbed gradient at theta0 is 0), so every fine-tune also drifts toward one shared shrunk point: the
  same shift in every column, which the centred estimators subtract only to first order.
* ``theta0``: lambda/2 ||theta - theta0||^2, the Bregman form of the regularised objective: its gradient at
  theta0 is 0, so the unperturbed optimum is theta0 itself, with the same curvature H + lambda I.

The weights c_ik come from :class:`daunce_store.store.PerturbationDraw` (``perturbation_weights`` is
re-exported here for the public name ``daunce_store.perturb.perturbation_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from daunce_store.errors import InvalidInputError
from daunce_store.store import perturbation_weights

__all__ = ["LOSS_ONLY", "perturbation_weights", "reference_terms", "perturbed_objective", "batch_objective", "l2_penalty",
           "l2_center"]

#: The objective forms computed from the fine-tuned model's losses alone (no theta0 outputs).
LOSS_ONLY = ("blackbox", "reweighted")


def l2_penalty(params: Iterable[torch.Tensor], weight_decay: float,
               center: Sequence[torch.Tensor] | None = None) -> torch.Tensor | float:
    """lambda/2 * sum_p ||p - p0||^2 (accumulated in float32 or wider), p0 = ``center`` (the parameters'
    values at theta0) or 0 when None (the target's own regulariser). 0.0 when lambda = 0."""
    if not weight_decay:
        return 0.0
    if center is None:
        return 0.5 * float(weight_decay) * sum(_upcast(p).pow(2).sum() for p in params)
    return 0.5 * float(weight_decay) * sum((_upcast(p) - _upcast(c)).pow(2).sum() for p, c in zip(params, center, strict=True))


def l2_center(params: Iterable[torch.Tensor], where: str) -> list[torch.Tensor] | None:
    """The centre of the L2 term for ``PerturbConfig.l2_center``: None ('zero'), or detached copies of the
    parameters as they are now ('theta0', called before the fine-tune's first step)."""
    return [p.detach().clone() for p in params] if where == "theta0" else None


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
    if objective == "reweighted":
        return ((2.0 - c.to(losses.dtype)) * losses).mean()
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
    disabled, or a cache); it is not called for the forms in :data:`LOSS_ONLY`.
    """
    outputs = task.outputs(model, batch)
    losses = task.per_example_loss(outputs, batch)
    if objective in LOSS_ONLY:
        return perturbed_objective(objective, losses, outputs, c)
    if reference is None:
        raise InvalidInputError(f"the {objective!r} objective needs theta0's outputs (a reference function)")
    with torch.no_grad():
        outputs0 = reference(batch)
    f0, loss0, grad0 = reference_terms(task, outputs0, batch)
    return perturbed_objective(objective, losses, outputs, c, loss0, f0, grad0, gamma)
