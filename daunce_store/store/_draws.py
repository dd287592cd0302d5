"""The random draw of perturbation k: its subset D_k and weights xi_k, regenerable for any row range.

Perturbation k of a store with seed s draws, for every train example i, two uniforms from a counter-based
generator keyed on (s, k): i is in D_k when the first is below the subset ratio r (Poisson sampling, so
|D_k| ~ Binomial(n, r)), and the second is xi_ik ~ U(0, 1). Because a value depends only on (s, k, i),
the weights of any row block come without the full vector: the Nyström measure regenerates them block by
block while it streams the losses (DESIGN §1.1), and the runner draws the same values for the whole set.

The generator is SplitMix64 (Steele, Lea, Flood 2014): ``mix(key + (i + 1) * golden)``, with the key
from ``numpy.random.SeedSequence([s, k, stream])``. It is written once, here; a commit made by the runner
records :meth:`PerturbationDraw.to_metadata` under ``metadata["draw"]`` so scoring knows the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daunce_store._ext import extension
from daunce_store.errors import CorruptRecordError, InvalidInputError

__all__ = ["DRAW_SCHEME", "OBJECTIVES", "PerturbationDraw", "perturbation_weights", "weights_block"]

DRAW_SCHEME = "splitmix64-v1"
OBJECTIVES = ("if", "fisher", "blackbox", "reweighted")
_SUBSET_STREAM, _XI_STREAM = 0, 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _uniforms(key: np.uint64, r0: int, r1: int) -> np.ndarray:
    """U[0, 1) values of rows r0 .. r1-1 (row i: counter i + 1; float64, 53 random bits each)."""
    fast = getattr(extension(), "splitmix64_uniforms", None)
    if fast is not None:  # the same integer arithmetic in Rust, ~10x faster (the Nyström pass regenerates n·K)
        return fast(int(key), int(r0), int(r1 - r0))
    x = key + (np.arange(r0 + 1, r1 + 1, dtype=np.uint64) * _GOLDEN)  # uint64 arithmetic wraps mod 2^64
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def perturbation_weights(xi: np.ndarray, objective: str, rho: float) -> np.ndarray:
    """c_ik from xi_ik ~ U(0, 1): 1 + rho(2 xi - 1) for 'if' and 'reweighted' (whose loss weights are 2 - c),
    rho(2 xi - 1) for 'fisher', 0 for 'blackbox'."""
    xi = np.asarray(xi, dtype=np.float64)
    if objective in ("if", "reweighted"):
        return 1.0 + rho * (2.0 * xi - 1.0)
    if objective == "fisher":
        return rho * (2.0 * xi - 1.0)
    if objective == "blackbox":
        return np.zeros_like(xi)
    raise InvalidInputError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


@dataclasses.dataclass(frozen=True)
class PerturbationDraw:
    """The random draw of perturbation ``k`` of a store seeded ``store_seed``.

    >>> draw = PerturbationDraw(store_seed=0, k=3, ratio=0.3)
    >>> bool((draw.xi(0, 10)[4:] == draw.xi(4, 10)).all())     # any row range, same values
    True
    >>> PerturbationDraw.from_metadata({"draw": draw.to_metadata()}) == draw
    True
    """

    store_seed: int
    k: int
    ratio: float
    objective: str = "if"
    rho: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise InvalidInputError(f"subset ratio {self.ratio} must be in (0, 1]")
        if self.objective not in OBJECTIVES:
            raise InvalidInputError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")

    def _key(self, stream: int) -> np.uint64:
        ss = np.random.SeedSequence([int(self.store_seed), int(self.k), stream])
        return ss.generate_state(1, dtype=np.uint64)[0]

    def in_subset(self, r0: int, r1: int) -> np.ndarray:
        """Whether rows r0 .. r1-1 are in D_k (bool)."""
        return _uniforms(self._key(_SUBSET_STREAM), r0, r1) < float(self.ratio)

    def xi(self, r0: int, r1: int) -> np.ndarray:
        """xi_ik ~ U(0, 1) of rows r0 .. r1-1 (float64)."""
        return _uniforms(self._key(_XI_STREAM), r0, r1)

    def subset(self, n: int) -> np.ndarray:
        """The indices of D_k among n train examples, ascending (never empty: a one-example set if the
        draw left it empty)."""
        idx = np.flatnonzero(self.in_subset(0, n))
        if len(idx) == 0 and n > 0:
            idx = np.array([int(np.argmin(_uniforms(self._key(_SUBSET_STREAM), 0, n)))])
        return idx

    def c(self, r0: int, r1: int) -> np.ndarray:
        """The objective's per-example weights c_ik of rows r0 .. r1-1."""
        return perturbation_weights(self.xi(r0, r1), self.objective, float(self.rho))

    def linear_weights(self, r0: int, r1: int) -> tuple[np.ndarray, int]:
        """(a_ik · 1[i ∈ D_k] of rows r0 .. r1-1 as float64, how many of those rows are in D_k).

        Linearized, the fine-tune moves θ by H⁻¹ Σ_i a_ik 1[i∈D_k] g_i / |D_k| (DESIGN §1.1): a = c − γ
        (IF form; the reweighted-loss form too, whose γ is 1), c (Fisher form; its H is the Fisher), −1
        (black-box: plain fine-tuning on D_k, up to a term that is the same for every k).
        """
        params = self._parameters()
        fused = getattr(extension(), "draw_linear_weights", None)
        if fused is not None:  # one pass in Rust
            return fused(*params, int(r0), int(r1 - r0))
        _, _, _, base, rho, shift, blackbox = params
        member = self.in_subset(r0, r1)
        if blackbox:
            a = -np.ones(r1 - r0)
        else:  # the same operations, in the same order, as the Rust path: bit-identical results
            a = (base + rho * (2.0 * self.xi(r0, r1) - 1.0)) - shift
        return np.where(member, a, 0.0), int(member.sum())

    def _parameters(self) -> tuple[int, int, float, float, float, float, bool]:
        """(key_subset, key_xi, ratio, base, rho, shift, blackbox): a = (base + rho(2ξ − 1)) − shift."""
        base, shift = (1.0, float(self.gamma)) if self.objective in ("if", "reweighted") else (0.0, 0.0)
        return (int(self._key(_SUBSET_STREAM)), int(self._key(_XI_STREAM)), float(self.ratio), base, float(self.rho),
                shift, self.objective == "blackbox")

    # --- the commit record ---------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, Any]:
        """What a commit stores under ``metadata["draw"]`` so that scoring can regenerate the weights."""
        return {"scheme": DRAW_SCHEME, **dataclasses.asdict(self)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> PerturbationDraw | None:
        """The draw recorded in a commit's metadata; None if it records none (an imported or black-box
        column appended without one, or a column written before draws were recorded)."""
        rec = metadata.get("draw") if isinstance(metadata, Mapping) else None
        if not isinstance(rec, Mapping) or rec.get("scheme") != DRAW_SCHEME:
            return None
        try:
            return cls(int(rec["store_seed"]), int(rec["k"]), float(rec["ratio"]), str(rec.get("objective", "if")),
                       float(rec.get("rho", 1.0)), float(rec.get("gamma", 1.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptRecordError(f"the draw recorded in a commit lacks or garbles {e}: {dict(rec)!r}") from None


def weights_block(draws: Sequence[PerturbationDraw], r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights of rows r0 .. r1-1 of several perturbations: a row-major float32 (R, K) block (column j:
    ``draws[j].linear_weights``) and each column's subset count (int64, K). The Nyström measure calls this
    for every row block, so the extension fills the block in one pass."""
    fused = getattr(extension(), "draw_weights_block", None)
    if fused is not None:
        params = list(zip(*(d._parameters() for d in draws)))
        dtypes = (np.uint64, np.uint64, np.float64, np.float64, np.float64, np.float64, np.bool_)
        block, members = fused(*(np.array(p, dtype=t) for p, t in zip(params, dtypes)), int(r0), int(r1 - r0))
        return block, members.astype(np.int64)
    block = np.empty((r1 - r0, len(draws)), np.float32)
    members = np.empty(len(draws), np.int64)
    for j, d in enumerate(draws):
        weights, members[j] = d.linear_weights(r0, r1)
        block[:, j] = weights
    return block, members
