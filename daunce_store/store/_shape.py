"""What :class:`~daunce_store.store.LossStore` gives its parts (the mixins: read path, leases, compaction,
maintenance; and the export and loss-matrix functions), declared once for the type checker: the public
API (:class:`~daunce_store.store.StoreLike`) and the private parts. At run time the class is empty: a stub
here would shadow the real method later in the MRO."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daunce_store.store._records import Commit, ImmutableRecords, Snapshot
from daunce_store.store._storage import Storage

if TYPE_CHECKING:  # the public API, as perturb sees it
    from daunce_store.store._store_like import StoreLike as _PublicAPI
else:
    _PublicAPI = object

__all__ = ["StoreShape"]


class StoreShape(_PublicAPI):
    _storage: Storage
    _root: Any
    _train_losses: Any
    _train_ids_arr: Any
    _packed: Any
    _manifests: ImmutableRecords[tuple[int, list[int]]]

    if TYPE_CHECKING:
        @property
        def capacity(self) -> int: ...
        @property
        def chunk_rows(self) -> int: ...
        @property
        def pack_width(self) -> int: ...
        def iter_row_blocks(
            self, *, snapshot: Snapshot | None = None, query_set: str | None = None, slots: Sequence[int] | None = None,
            block_rows: int | None = None, prefetch: int = 2, row_range: tuple[int, int] | None = None,
        ) -> Iterator[tuple[int, np.ndarray]]: ...
        def query_losses(self, name: str, *, snapshot: Snapshot | None = None, slots: Sequence[int] | None = None) -> np.ndarray: ...
        def _require_writable(self) -> None: ...
        def _committed_ids(self) -> set[str]: ...
        def is_committed(self, perturbation: str) -> bool: ...
        def _query(self, name: str) -> tuple[Any, np.ndarray, dict[str, int]]: ...
        def _pack_map(self) -> dict[int, tuple[int, int]]: ...
        def _packed_array(self, create: bool = False) -> Any: ...
        def _read_rows(self, arr: Any, r0: int, r1: int, slots: Any, *, use_packs: bool = True) -> np.ndarray: ...
        def _delete_column_chunks(self, arr: Any, column: int, report: Any) -> None: ...
        def stale_leases(self) -> list[dict[str, Any]]: ...
