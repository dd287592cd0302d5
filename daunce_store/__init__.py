"""daunce-store: training-data attribution by Daunce (covariance of losses across perturbed models),
with a Zarr loss store and a streaming top-k kernel.

>>> import daunce_store
>>> store = daunce_store.open("attrib.zarr")            # doctest: +SKIP
>>> store.topk("test", k=10).to_pandas()                 # doctest: +SKIP
"""

from __future__ import annotations

from daunce_store import errors
from daunce_store._api import Store, init
from daunce_store._api import open  # noqa: A001 - the obvious name for the entry point
from daunce_store.errors import DaunceStoreError
from daunce_store.scoring import Attribution, Scores, Stability
from daunce_store.store import Commit, Lease, LossStore, PerturbationDraw, Snapshot

__all__ = [
    "Attribution",
    "Commit",
    "DaunceStoreError",
    "Lease",
    "LossStore",
    "PerturbationDraw",
    "Scores",
    "Snapshot",
    "Stability",
    "Store",
    "errors",
    "init",
    "open",
]
__version__ = "0.1.0"
