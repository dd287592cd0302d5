"""The drift diagnostic: the share of the fine-tunes' loss change that every column has in common.

**Definition.** For K columns of train signals L (n × K) and θ0's own signal L0 (n), the loss change is
D = L − L0·1ᵀ, with columns d_k. Its mean across the columns, d̄ = (1/K) Σ_k d_k (n), is the change all the
fine-tunes share: a drift of every column toward one point. The drift share is the fraction of ‖D‖² it
explains::

    drift = K·‖d̄‖² / ‖D‖²_F          in [0, 1]

0: the columns' changes have no common part; 1: every column moved by the same change, and the centred
columns the measures score are left with nothing. With the plain L2 term λ/2‖θ‖² every fine-tune is pulled
toward one shrunk point (θ0 is not the unperturbed optimum); with λ/2‖θ − θ0‖² (``l2_center: theta0``) it is
not (DESIGN §1.2).

**Per commit, exact at read time.** ‖D‖² = K‖d̄‖² + ‖D − d̄1ᵀ‖², and D − d̄1ᵀ = L − L̄1ᵀ: the centred
columns, in which L0 cancels. So::

    drift = 1 − ‖L − L̄1ᵀ‖²_F / Σ_k ‖d_k‖²

Each commit records its own ‖d_k‖² (``metadata["train_change"]["sum_sq"]``; the runner evaluates θ0's
signal once per worker), and the rest comes from the stored columns in one pass. Every column's record is
its own (no running mean over earlier commits, which would depend on the order in which concurrent
workers commit), and the share is exact for any set of columns. A column without the record (written
before it existed, appended by hand, imported) makes the share unknown (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from daunce_store.errors import InvalidInputError

if TYPE_CHECKING:
    from daunce_store.store import LossStore, Snapshot

__all__ = ["DriftAccumulator", "drift_share", "l2_center_of"]

MIXED = "mixed"  # l2_center_of: columns made with different centres


class DriftAccumulator:
    """The drift share of one set of columns, from their recorded ‖d_k‖² and one pass over their row blocks."""

    def __init__(self, change_sum_sq: float, num_columns: int):
        self.change_sum_sq = float(change_sum_sq)  # Σ_k ‖d_k‖²
        self.num_columns = int(num_columns)
        self.centred_sum_sq = 0.0  # ‖L − L̄1ᵀ‖², accumulated block by block

    @classmethod
    def of(cls, snapshot: Snapshot, slots: Sequence[int], n_train: int) -> DriftAccumulator | None:
        """For the columns in ``slots``; None when one of them records no ``train_change`` of n_train rows."""
        by_slot = {c.slot: c for c in snapshot.commits}
        total = 0.0
        for s in slots:
            commit = by_slot.get(s)
            change = commit.metadata.get("train_change") if commit is not None else None
            if not isinstance(change, dict) or change.get("rows") != n_train or not isinstance(change.get("sum_sq"), (int, float)):
                return None
            total += float(change["sum_sq"])
        return cls(total, len(slots)) if len(slots) >= 2 else None

    def push(self, block: np.ndarray) -> None:
        """Add a row block (R, K) of the columns, in their order."""
        b = np.asarray(block, dtype=np.float64)
        b = b - b.mean(axis=1, keepdims=True)
        self.centred_sum_sq += float(np.einsum("ij,ij->", b, b))

    @property
    def share(self) -> float:
        """1 − ‖L − L̄1ᵀ‖² / Σ_k ‖d_k‖², held to [0, 1] (float rounding); 0 when nothing changed."""
        if self.change_sum_sq <= 0.0:
            return 0.0
        return float(min(1.0, max(0.0, 1.0 - self.centred_sum_sq / self.change_sum_sq)))


def drift_share(store: LossStore, *, snapshot: Snapshot | None = None, columns: Sequence[int] | None = None) -> float | None:
    """The drift share of the committed columns of ``snapshot`` (taken now when None; ``columns``: their
    positions 0..K-1, default all), or None when one of them records no loss change (see the module
    docstring). Reads their train losses once."""
    snap = snapshot if snapshot is not None else store.snapshot()
    slots = list(snap.slots)
    if columns is not None:
        if any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < len(slots) for p in columns):
            raise InvalidInputError(f"columns must be positions 0..{len(slots) - 1} of the committed columns, not {list(columns)!r}")
        slots = [slots[int(p)] for p in columns]
    acc = DriftAccumulator.of(snap, slots, store.n_train)
    if acc is None:
        return None
    for _, block in store.rows(snap, slots).blocks():
        acc.push(block)
    return acc.share


def l2_center_of(snapshot: Snapshot, slots: Sequence[int]) -> str | None:
    """Where the columns' objective centred its L2 term (``metadata["l2_center"]``: "zero" or "theta0"),
    ``MIXED`` when they differ, None (unknown) when a column does not say."""
    by_slot = {c.slot: c for c in snapshot.commits}
    seen = {by_slot[s].metadata.get("l2_center") if s in by_slot else None for s in slots}
    if None in seen or not seen:
        return None
    return seen.pop() if len(seen) == 1 else MIXED
