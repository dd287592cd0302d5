"""The Daunce perturbed objective (DESIGN §1), written in output space.

Per batch B of the random subset D_k::

    IF:      gamma * mean_i [l_i(theta) - l_i(theta0)]    - mean_i c_ik <f_theta(x_i) - f_theta0(x_i), dl_i/df|theta0>
             c_ik = 1 + rho (2 xi_ik - 1)
    Fisher:  gamma * mean_i [l_i(theta) - l_i(theta0)]^2  - mean_i c_ik <...>,   c_ik = rho (2 xi_ik - 1)
    blackbox: mean_i l_i(theta)   (plain fine-tuning on D_k)

The inner product's gradient is J_i(theta)^T dl_i/df|theta0, which at theta = theta0 is the per-example
parameter gradient: so the objective's gradient at theta0 is mean_i (gamma - c_ik) grad l_i (IF) and
-mean_i c_ik grad l_i (Fisher), a randomly reweighted loss, without any per-example parameter gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from daunce_store.errors import InvalidInputError

__all__ = ["perturbation_weights", "reference_terms", "perturbed_objective", "batch_objective"]


def perturbation_weights(xi: np.ndarray, objective: str, rho: float) -> np.ndarray:
    """c_ik from xi_ik ~ U(0, 1): 1 + rho(2 xi - 1) for 'if', rho(2 xi - 1) for 'fisher', 0 for 'blackbox'."""
    xi = np.asarray(xi, dtype=np.float64)
    if objective == "if":
        return 1.0 + rho * (2.0 * xi - 1.0)
    if objective == "fisher":
        return rho * (2.0 * xi - 1.0)
    if objective == "blackbox":
        return np.zeros_like(xi)
    raise InvalidInputError(f"objective {objective!r} is not one of if, fisher, blackbox")


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
