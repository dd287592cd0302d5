"""The loss store: Zarr arrays of per-example losses plus an atomic commit log."""

from __future__ import annotations

from daunce_store.store._derived import column_checksum, read_derived_matrix, read_row_scales, write_derived_matrix, write_row_scales
from daunce_store.store._draws import DRAW_SCHEME, PerturbationDraw, perturbation_weights, weights_block
from daunce_store.store._inputs import (DATA_FILE_FORMATS, DIVERGED_ADVICE, DataFile, data_file_format, data_file_specs, read_data_file,
                                        read_ids, read_losses, validate_ids, validate_losses)
from daunce_store.store._matrix import append_query_matrix, read_loss_matrix
from daunce_store.store._maintenance import DEFAULT_GRACE_SECONDS, Finding, GcReport, VerifyReport
from daunce_store.store._ids import ids_checksummed, ids_digest
from daunce_store.store._loss_store import Commit, Lease, LossStore, OpenMode, Snapshot, init_store, open_store
from daunce_store.store._oserrors import storage_errors
from daunce_store.store._records import default_worker_name, iso, perturbation_id
from daunce_store.store._rows import ChunkSink, ChunkSource, MemoryRows, RowSource, StoreRows
from daunce_store.store._storage import Storage
from daunce_store.store._store_like import StoreLike
from daunce_store.store._tables import EXPORT_FORMS, TABLE_FORMATS, ExportForm, TableFormat, dumps_json, json_ready, write_frames, write_json, write_records

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "Finding",
    "GcReport",
    "VerifyReport",
    "DRAW_SCHEME",
    "column_checksum",
    "read_derived_matrix",
    "write_derived_matrix",
    "read_row_scales",
    "write_row_scales",
    "Commit",
    "Lease",
    "LossStore",
    "PerturbationDraw",
    "Snapshot",
    "Storage",
    "ChunkSink",
    "ChunkSource",
    "MemoryRows",
    "RowSource",
    "StoreRows",
    "StoreLike",
    "ids_checksummed",
    "ids_digest",
    "init_store",
    "open_store",
    "perturbation_id",
    "default_worker_name",
    "iso",
    "storage_errors",
    "TABLE_FORMATS",
    "TableFormat",
    "EXPORT_FORMS",
    "ExportForm",
    "OpenMode",
    "write_frames",
    "write_json",
    "write_records",
    "json_ready",
    "dumps_json",
    "perturbation_weights",
    "weights_block",
    "append_query_matrix",
    "read_loss_matrix",
    "DATA_FILE_FORMATS",
    "DataFile",
    "data_file_format",
    "data_file_specs",
    "read_data_file",
    "read_ids",
    "read_losses",
    "validate_ids",
    "validate_losses",
    "DIVERGED_ADVICE",
]
