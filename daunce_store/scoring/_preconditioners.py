"""The K × K preconditioners of the score measures, as registered classes.

Each one says what it is called, whether it needs every column's recorded draw, what one row block adds to
its K × K matrix, how the summed matrix is finished, how the matrix becomes the preconditioner M of a column
selection, and what it can say about its own health. Everything that used to branch on a measure's name
(the Gram pass, its Dask task, ``resolve_measure``, ``stability``) asks the class instead, so a new
preconditioner is one subclass in one file: defining it registers it (its ``name``, and the measures
``<name>`` and ``<name>-corr``), and an unknown name raises wherever it is looked up.

The matrices (DESIGN §1.1), with ū_i row i's losses centered over the K columns:

* ``nystrom`` — Σ_i w_i ū_iᵀ = W̄ᵀŪ, w_ik = a_ik·1[i∈D_k]/|D_k| regenerated from each commit's recorded draw;
  M = pinv(sym(W̄ᵀŪ)) with small eigenvalues raised to ``NYSTROM_FLOOR``·λ_max.
* ``whitened`` — Σ_i ū_i ū_iᵀ = ŪᵀŪ; M = (ŪᵀŪ + λI)⁻¹, λ = ``WHITEN_RIDGE``·tr(ŪᵀŪ)/K.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from daunce_store.errors import InvalidInputError, NotEnoughColumnsError
from daunce_store.store import PerturbationDraw, weights_block

__all__ = ["NYSTROM_FLOOR", "WHITEN_RIDGE", "Preconditioner", "PRECONDITIONERS", "preconditioner_named"]

# Measured on the LDS testbeds (bench/RESULTS.md, "Accuracy"): a plain ridge on sym(W̄ᵀŪ) collapses at
# K = 256 (near-zero and negative eigenvalues); raising them to 2-3 % of the largest is stable.
NYSTROM_FLOOR = 0.03
# Whitening ridge λ = 0.3 · tr(ŪᵀŪ)/K: LDS is flat around it (0.1-1.0 measured within 0.01-0.02).
WHITEN_RIDGE = 0.3

PRECONDITIONERS: dict[str, Preconditioner] = {}  # by name, in definition order (the order measures are listed)

CONSTANT_LOSSES = "every train loss is constant across the perturbations; nothing to score"


class Preconditioner:
    """A K × K preconditioner. Subclasses set the class attributes and implement the methods; defining a
    subclass registers one instance of it under ``name``."""

    name: ClassVar[str]
    needs_draws: ClassVar[bool]  # every column must record its perturbation's draw (its weights)
    help: ClassVar[str]  # of the measure <name>
    corr_help: ClassVar[str]  # of the measure <name>-corr

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in PRECONDITIONERS:
            raise TypeError(f"a preconditioner named {cls.name!r} is already registered")
        PRECONDITIONERS[cls.name] = cls()

    def block_part(self, u: np.ndarray, offset: int, draws: Sequence[PerturbationDraw]) -> tuple[np.ndarray, np.ndarray]:
        """One row block's term of the matrix: ``(part (K, K) float64, per-column counts (K,) or empty)``;
        ``u``: the block's rows centered over K (float32), starting at train row ``offset``."""
        raise NotImplementedError

    def finish(self, matrix: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The summed parts, and their summed counts, made the stored matrix."""
        return matrix

    def matrix(self, b: np.ndarray, spread_constant: bool) -> np.ndarray:
        """M (before projection) from ``b``, the stored matrix of a column selection, centered (P Eᵀ A E P);
        ``spread_constant``: no train loss varies across the columns at all."""
        raise NotImplementedError

    def diagnostics(self, b: np.ndarray) -> dict[str, float]:
        """Health numbers of ``b`` (as for :meth:`matrix`), reported beside a ranking (``stability``)."""
        return {}


class Nystrom(Preconditioner):
    name = "nystrom"
    needs_draws = True
    help = "targets the influence function (best LDS; needs the runner's recorded draws)"
    corr_help = "nystrom normalised by the train example's self-score (retrieval)"

    def block_part(self, u: np.ndarray, offset: int, draws: Sequence[PerturbationDraw]) -> tuple[np.ndarray, np.ndarray]:
        w, members = weights_block(draws, offset, offset + len(u))  # (R, K) row-major: see below
        # w.T @ u with w row-major: measured 100x faster in OpenBLAS than a (K, R) C-order left side.
        with np.errstate(over="ignore", invalid="ignore"):
            part = (w.T @ u).astype(np.float64)
        return part, np.asarray(members, dtype=np.float64)

    def finish(self, matrix: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return matrix / np.maximum(counts, 1.0)[:, None]  # row k of WᵀŪ carries 1/|D_k|

    def matrix(self, b: np.ndarray, spread_constant: bool) -> np.ndarray:
        vals, vecs = np.linalg.eigh(0.5 * (b + b.T))
        top = vals.max()
        if not top > 0 and spread_constant:
            raise NotEnoughColumnsError(CONSTANT_LOSSES)
        if not top > 0:
            raise InvalidInputError(
                "the train losses do not respond to the recorded perturbation weights (W̄ᵀŪ has no positive "
                "eigenvalue): the draws recorded with the columns do not match them; use --measure whitened"
            )
        vals = np.maximum(vals, NYSTROM_FLOOR * top)
        return (vecs / vals) @ vecs.T

    def diagnostics(self, b: np.ndarray) -> dict[str, float]:
        # asymmetry: ‖B − Bᵀ‖ / ‖B + Bᵀ‖ of the centered W̄ᵀŪ, 0 for a perfectly linear response. negative_share:
        # of sym(B)'s K − 1 eigenvalues outside the centring's null direction, the share below 0 (a linear response
        # makes sym(B) = W̄ᵀTW̄ positive semi-definite); the floor raises them. Reported by ``stability``.
        vals = np.linalg.eigvalsh(0.5 * (b + b.T))
        vals = np.delete(vals, np.argmin(np.abs(vals)))
        return {"asymmetry": float(np.linalg.norm(b - b.T)) / max(float(np.linalg.norm(b + b.T)), 1e-300),
                "negative_share": float(np.mean(vals < 0)) if len(vals) else 0.0}


class Whitened(Preconditioner):
    name = "whitened"
    needs_draws = False
    help = "whitened covariance (no weights needed: black-box or imported columns)"
    corr_help = "whitened normalised by the train example's self-score (retrieval)"

    def block_part(self, u: np.ndarray, offset: int, draws: Sequence[PerturbationDraw]) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            return (u.T @ u).astype(np.float64), np.zeros(0)

    def matrix(self, b: np.ndarray, spread_constant: bool) -> np.ndarray:
        kk = len(b)
        ridge = WHITEN_RIDGE * np.trace(b) / kk
        if not ridge > 0:
            raise NotEnoughColumnsError(CONSTANT_LOSSES)
        return np.linalg.inv(b + ridge * np.eye(kk))


def preconditioner_named(name: str) -> Preconditioner:
    """The registered preconditioner called ``name``; an unknown name is an error, never a default."""
    try:
        return PRECONDITIONERS[name]
    except KeyError:
        raise InvalidInputError(f"no preconditioner is called {name!r}; known: {', '.join(PRECONDITIONERS)}") from None
