"""Names and numbers of the on-disk format, in one place (FORMAT.md at the project root documents them).

A daunce store is a Zarr v3 hierarchy plus a small commit log of JSON records kept beside it under
``_daunce/``. Readers trust commit records only: a column's chunks become visible to them once its
record exists, and a record is created with an atomic create-if-absent put.
"""

from __future__ import annotations

from typing import Literal, get_args

FORMAT_VERSION = 1
FORMAT_NAME = "daunce-store"
ROOT_ATTR = "daunce_store"  # root group attribute holding {format, format_version, seed, ...}

TRAIN_GROUP = "train"
QUERIES_GROUP = "queries"
IDS_ARRAY = "ids"
LOSSES_ARRAY = "losses"
IDS_DIGEST_ATTR = "sha256"  # attribute of every ids array: sha256 of its ids joined by newlines

# Commit log (create-if-absent JSON records under LOG_PREFIX).
LOG_PREFIX = "_daunce"
SLOTS_PREFIX = f"{LOG_PREFIX}/slots"  # slots/<slot>.json : a claimed physical column
COMMITS_PREFIX = f"{LOG_PREFIX}/commits"  # commits/<perturbation>.json : a committed column
QUERY_COMMITS_PREFIX = f"{LOG_PREFIX}/query-commits"  # query-commits/<set>/<perturbation>.json
LEASES_PREFIX = f"{LOG_PREFIX}/leases"  # leases/<perturbation>/<generation>.json
PACK_CLAIMS_PREFIX = f"{LOG_PREFIX}/pack-claims"  # pack-claims/<group>.json : a compactor owns a group
PACKS_PREFIX = f"{LOG_PREFIX}/packs"  # packs/<group>.json : committed columns packed into a group
FATES_PREFIX = f"{LOG_PREFIX}/fates"  # fates/slot-<slot>.json, fates/group-<g>.json : writer or gc, whoever is first
CLOCK_PREFIX = f"{LOG_PREFIX}/clock"  # clock/<uuid>.json : gc's storage-clock probe, written and removed at once
RECLAIMED_PREFIX = f"{LOG_PREFIX}/reclaimed"  # reclaimed/<slot>.json : a packed slot's per-column chunks are gone (gc)
ADAPTERS_PREFIX = f"{LOG_PREFIX}/adapters"  # adapters/<perturbation>.safetensors : a perturbation's trained weights
MATRICES_PREFIX = f"{LOG_PREFIX}/matrices"  # matrices/<kind>/<key sha256>.json : a K x K matrix derived from committed columns
SCALES_PREFIX = f"{LOG_PREFIX}/row-scales"  # row-scales/<kind>/<key sha256>.json + <bytes sha256>.f32 : the -corr measures' per-row scales

# Compaction: committed per-column chunks are copied, PACK_WIDTH columns at a time, into the wide array
# train/packed with chunks (min(chunk_rows, PACK_ROWS), PACK_WIDTH); wide chunks read several times
# faster than 1-wide ones (bench/RESULTS.md, "Store layout").
PACKED_ARRAY = "packed"
DEFAULT_PACK_WIDTH = 64
PACK_ROWS = 1 << 16

# Columns are pre-allocated: Zarr chunks are sparse, so an unwritten column costs nothing on disk, and a
# fixed capacity means appends never rewrite array metadata (which concurrent writers could race on).
DEFAULT_CAPACITY = 1 << 16
# Rows per chunk of the per-column layout (see bench/RESULTS.md for the measurements behind it).
DEFAULT_CHUNK_ROWS = 1 << 18
DEFAULT_LEASE_SECONDS = 600.0

# The largest |loss| a column may hold (append refuses more, as a diverged fine-tune). Scores are float32:
# the kernels centre rows (|x - mean| <= 2 B for |x| <= B) and sum products of them, the preconditioned
# measures' Gram sums R squares per row block, and self-influence holds a variance. With B = 1e15 a square
# is at most 4e30, so a sum of K (<= the capacity 65536) or R (a block's rows, ~8.5e7 at most) of them stays
# below float32's 3.4e38; B = 1e20 (seen from a diverged fine-tune) scored "Infinity" under cov and broke
# the Gram. Real losses (cross-entropy, margins, squared errors) are far below it.
MAX_ABS_LOSS = 1e15

# Environment variable that forces the pure-Python / numba paths even when the extension is built.
NO_EXT_ENV = "DAUNCE_STORE_NO_EXT"

# Commit metadata of the runner's columns read back by scoring (FORMAT.md, "Commit metadata").
# Where the L2 term of the perturbed objective is centred (PerturbConfig.l2_center, metadata["l2_center"]).
L2Center = Literal["zero", "theta0"]
L2_CENTERS: tuple[L2Center, ...] = get_args(L2Center)
