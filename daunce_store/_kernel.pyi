"""Type stubs for the Rust extension ``daunce_store._kernel`` (rust/src/python.rs)."""

import os
from typing import final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__all__ = ["row_variance", "splitmix64_uniforms", "draw_linear_weights", "draw_weights_block", "read_block", "vlen_utf8_take",
           "ChunkReadError", "ChunkPlan", "ObjectStoreChunks", "TopKAccumulator"]

def row_variance(block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per-row variance (ddof = 1) of a C-contiguous float32 (R, K) block, summed in float64."""

def splitmix64_uniforms(key: int, r0: int, count: int) -> npt.NDArray[np.float64]:
    """SplitMix64 uniforms U[0, 1) of rows ``r0 .. r0 + count`` of stream ``key`` (row i: counter i + 1);
    bit-identical to the numpy fallback in ``daunce_store/store/_draws.py``."""

def draw_linear_weights(
    key_subset: int, key_xi: int, ratio: float, base: float, rho: float, shift: float, blackbox: bool, r0: int, count: int
) -> tuple[npt.NDArray[np.float64], int]:
    """Linearized perturbation weights a_ik·1[i ∈ D_k] of rows ``r0 .. r0 + count`` and how many of them
    are in D_k; bit-identical to ``PerturbationDraw.linear_weights``'s numpy path."""

def draw_weights_block(
    key_subset: npt.NDArray[np.uint64], key_xi: npt.NDArray[np.uint64], ratio: npt.NDArray[np.float64],
    base: npt.NDArray[np.float64], rho: npt.NDArray[np.float64], shift: npt.NDArray[np.float64],
    blackbox: npt.NDArray[np.bool_], r0: int, rows: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint64]]:
    """The weights of rows ``r0 .. r0 + rows`` of K perturbations at once: a row-major float32 (rows, K)
    block and each column's subset count; the same values as ``PerturbationDraw.linear_weights``."""

class ChunkReadError(ValueError):
    """A chunk ``read_block`` needed is missing, has the wrong size or a failed crc32c, or holds NaN in a
    column it copies, or the object store did not answer its GET; ``args`` = (kind: "missing" | "corrupt"
    | "nan" | "fetch", chunk key, message)."""

@final
class ChunkPlan:
    """Which chunks make up a block (rust/src/python.rs): for each block column, the array column it comes
    from. Chunks are plain float32 little endian + crc32c, keys ``<array>/c/<row chunk>/<column chunk>``."""

    def __new__(cls) -> Self: ...
    def add_column(self, array: str, chunk_rows: int, chunk_cols: int, column: int, block_column: int) -> None:
        """Block column ``block_column`` is column ``column`` of the array at path ``array`` in the store,
        whose chunks are (chunk_rows, chunk_cols); ValueError for an empty chunk shape or a second shape."""
    @property
    def chunk_heights(self) -> list[int]:
        """The chunk height of each chunk file of a row chunk (one per array and column chunk)."""
    @property
    def ncols(self) -> int:
        """The block's columns (as many as were added)."""

@final
class ObjectStoreChunks:
    """The Rust reader's client of an ``s3://`` store (rust/src/chunks.rs), configured by the ``AWS_*``
    environment and ``options`` (object_store's keys: ``endpoint``, ``access_key_id``, ``allow_http``, ...);
    ValueError for another scheme or an unknown key."""

    def __new__(cls, url: str, options: dict[str, str]) -> Self: ...
    @property
    def gets(self) -> int:
        """How many chunk GETs this client has sent."""

def read_block(
    source: str | os.PathLike[str] | ObjectStoreChunks,
    plan: ChunkPlan,
    r0: int,
    r1: int,
    out: npt.NDArray[np.float32],
    threads: int | None = None,
) -> None:
    """Fill ``out``, a C-contiguous float32 (r1 - r0, ncols) array, with rows ``r0 .. r1`` of the block
    ``plan`` assembles from the Zarr v3 chunks of ``source`` (a local store's root, or an object store's
    client: its chunks fetched many at once; the plan's chunk heights must then be one) (rust/src/read.rs).
    Every checksum is verified; every block column must be named once. Runs on ``threads`` threads
    (default: the kernel's) with the GIL released. ValueError for an inconsistent request,
    ChunkReadError for damage."""

@final
class TopKAccumulator:
    """Streaming top-k over row blocks (DESIGN §4); the GIL is released during every call.

    Memory is O(threads · (chunk · K + m · k)), independent of how many rows are pushed.
    """

    def __new__(
        cls,
        queries: npt.NDArray[np.float32],
        k: int,
        measure: str = "cov",
        pos: bool = True,
        neg: bool = True,
        queries_prepared: bool = False,
    ) -> Self:
        """``queries``: C-contiguous float32 (m, K). ``measure``: "cov" or "corr". With
        ``queries_prepared`` the rows are used as given (centered, scaled; see ``prepare_queries``)."""

    @property
    def rows_seen(self) -> int: ...
    def set_transform(self, transform: npt.NDArray[np.float32]) -> None:
        """Score every row pushed from now on as ``center(x) @ transform`` ((K, K) float32), then prepared
        as usual (the normalised preconditioned measures: transform = M^½)."""

    def set_row_scales(self, scales: npt.NDArray[np.float32]) -> None:
        """Multiply every score of train row i pushed from now on by ``scales[i]`` ((n,) float32): the
        normalised preconditioned measures scored as cov rows with their persisted self-score norms."""

    def push_block(self, offset: int, block: npt.NDArray[np.float32]) -> None:
        """Fold rows ``offset .. offset + R`` of a C-contiguous float32 (R, K) block (any order)."""

    def push_chunks(self, source: str | os.PathLike[str] | ObjectStoreChunks, plan: ChunkPlan, r0: int, r1: int) -> None:
        """Fold rows ``r0 .. r1`` of the block ``plan`` assembles from the chunks of ``source`` (as for
        :func:`read_block`; one chunk height), each segment scored while it is in cache (an object store's
        chunks fetched ahead), the GIL released. On a ``ChunkReadError`` the accumulator is void: make a
        new one."""

    def push_scores(self, offset: int, scores: npt.NDArray[np.float32]) -> None:
        """Fold precomputed scores (R,) of rows ``offset .. offset + R``; single-query accumulators."""

    def finish(self) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """``{side: (indices (m, k), scores (m, k))}`` best first (ties: lower index); ValueError if
        fewer than k rows were pushed. The accumulator cannot be used afterwards."""

def vlen_utf8_take(data: bytes, positions: list[int]) -> list[str]:
    """The strings at ``positions`` (any order, repeats allowed) of a decoded Zarr ``vlen-utf8`` chunk
    (rust/src/vlen.rs), building only those; ValueError for a truncated or non-UTF-8 chunk."""
