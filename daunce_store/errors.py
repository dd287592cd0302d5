"""One error hierarchy: every error daunce-store raises on purpose is a ``DaunceStoreError``.

Each message says what is wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "DaunceStoreError",
    "InvalidInputError",
    "DivergedError",
    "NotADaunceStoreError",
    "StoreVersionError",
    "StoreExistsError",
    "UnknownQuerySetError",
    "UnknownIdError",
    "AlreadyCommittedError",
    "LeaseError",
    "NotEnoughColumnsError",
    "CorruptChunkError",
    "CorruptRecordError",
    "CapacityError",
    "ReclaimedError",
    "StorageError",
    "ScoreUnderflowError",
    "ConvergenceWarning",
    "UntrainedModelWarning",
    "ConstantQueryWarning",
    "MissingQueryLossesWarning",
    "IdNormalizationWarning",
    "MissingDependencyError",
]


class DaunceStoreError(ValueError):
    """Base class of every error raised by daunce-store."""

    # Set only on an error that stopped a many-column append part-way (``LossStore.append_matrix``): the
    # perturbations committed before it, and those not committed.
    committed: list[str]
    not_committed: list[str]


class InvalidInputError(DaunceStoreError):
    """Bad user input: NaN/inf losses, wrong length or dtype, duplicate ids, bad names, bad k."""


class DivergedError(InvalidInputError):
    """Losses that are NaN, inf or beyond ±``MAX_ABS_LOSS`` (1e15): what a diverged fine-tune produces. The
    column is refused (float32 scores of it would overflow); rerun that perturbation with a lower learning
    rate. ``daunce perturb`` skips such a perturbation and goes on with the next."""


class NotADaunceStoreError(DaunceStoreError, FileNotFoundError):
    """The path holds no daunce store (nothing there, or a foreign Zarr hierarchy)."""


class StoreVersionError(DaunceStoreError):
    """The store was written by a newer format version than this package reads."""


class StoreExistsError(DaunceStoreError, FileExistsError):
    """``init`` was pointed at a path that already holds a store (or other data), or that lies inside one."""


class UnknownQuerySetError(DaunceStoreError, KeyError):
    """A query-set name that the store does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownIdError(DaunceStoreError, KeyError):
    """A train or query id that the store does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AlreadyCommittedError(DaunceStoreError):
    """A perturbation id that already has a committed column; appends are idempotent per id."""


class LeaseError(DaunceStoreError):
    """A lease could not be taken or renewed (another live worker holds it)."""


class NotEnoughColumnsError(DaunceStoreError):
    """Scoring needs at least two committed perturbation columns."""


class CorruptChunkError(DaunceStoreError):
    """A chunk failed its checksum or could not be decoded; the message names the chunk."""


class CorruptRecordError(DaunceStoreError):
    """A commit-log record (commit, slot or lease JSON) is truncated or not what this package wrote."""


class CapacityError(DaunceStoreError):
    """The store has no free column slot left."""


class ScoreUnderflowError(InvalidInputError):
    """Every cov score of a (non-constant) query is 0 or below float32's normal range (~1.2e-38): the losses
    vary only at a scale whose covariances underflow float32 (e.g. subnormal losses ~1e-40, covariances
    ~1e-81), so a top-k of those scores is row order, not an attribution. corr standardizes each row and
    scores such losses correctly."""


class StorageError(DaunceStoreError):
    """The disk or object store refused or failed an operation (disk full, I/O error, a fault that outlived
    the retries); the message names the store, the operation, and what was left behind."""


class ReclaimedError(DaunceStoreError):
    """``daunce gc`` reclaimed the slot or pack group this writer was filling (it took longer than gc's
    grace period); nothing of it became visible, so write it again."""


class ConvergenceWarning(UserWarning):
    """A perturbed fine-tune ended far from the optimum of its objective (its gradient norm fell too little);
    the column is kept, but Daunce's estimators assume the perturbed optimum was reached."""


class UntrainedModelWarning(UserWarning):
    """θ0's losses on its train data are near chance (a classifier's fresh head, a language model with random
    weights): Daunce's scores assume θ0 fits its data, so fine-tune it first or pass a trained model."""


class ConstantQueryWarning(UserWarning):
    """A query's loss is the same under every perturbation: it covaries with nothing, so its scores are all 0
    and its top-k lists are ties in row order, not attributions."""


class MissingQueryLossesWarning(UserWarning):
    """A column was committed without losses for some of the store's query sets: scoring those sets leaves it
    out until ``daunce append-queries`` (or ``LossStore.append_query_losses``) fills them."""


class IdNormalizationWarning(UserWarning):
    """Two ids differ only in Unicode normalisation (``"café"`` as NFC, one code point for the é, and as NFD,
    an e and a combining accent): they print alike but are different ids, so asking for one never finds the
    other. Write every id in one form (``unicodedata.normalize("NFC", id)``) before creating the store."""


class MissingDependencyError(DaunceStoreError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""
