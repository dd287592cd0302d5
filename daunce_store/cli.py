"""The ``daunce`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

import daunce_store
from daunce_store.errors import DaunceStoreError, InvalidInputError
from daunce_store.scoring import Attribution
from daunce_store.store import read_ids, read_losses

app = typer.Typer(
    name="daunce",
    help="Training-data attribution by Daunce: perturb, store loss columns, score top-k influences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

StoreArg = Annotated[str, typer.Argument(help="Store path or URL (s3://bucket/prefix, ...).")]


class Measure(str, Enum):
    cov = "cov"
    corr = "corr"


class Side(str, Enum):
    pos = "pos"
    neg = "neg"
    both = "both"


class OutFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


class Backend(str, Enum):
    auto = "auto"
    rust = "rust"
    numba = "numba"
    numpy = "numpy"


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise InvalidInputError(f"{what} {pair!r}: expected NAME=FILE")
        if name in out:
            raise InvalidInputError(f"{what} {name!r} given twice")
        out[name] = value
    return out


def _storage_options(options: Optional[str]) -> dict[str, Any] | None:
    if not options:
        return None
    try:
        value = json.loads(options)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"--storage-options must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise InvalidInputError("--storage-options must be a JSON object")
    return value


StorageOpt = Annotated[
    Optional[str],
    typer.Option("--storage-options", help='JSON for the object store, e.g. \'{"endpoint": "http://127.0.0.1:9000"}\'.'),
]


def _open(store: str, mode: str, storage_options: Optional[str]) -> daunce_store.LossStore:
    return daunce_store.open(store, mode=mode, storage_options=_storage_options(storage_options))  # type: ignore[arg-type]


def _emit(result: Attribution, fmt: OutFormat, output: Optional[Path], title: str) -> None:
    if output is not None:
        result.write(output, None if fmt == OutFormat.table else fmt.value)
        err_console.print(f"wrote {len(result.records())} records to {output}")
        return
    if fmt == OutFormat.table:
        table = Table(title=f"{title} ({result.measure}, K={result.num_columns})")
        for col in ("query", "side", "rank", "train_id", "train_index", "score"):
            table.add_column(col, justify="right" if col in ("rank", "train_index", "score") else "left")
        for r in result.records():
            table.add_row(r["query"], r["side"], str(r["rank"]), r["train_id"], str(r["train_index"]), f"{r['score']:.4g}")
        console.print(table)
    elif fmt == OutFormat.json:
        sys.stdout.write(json.dumps(result.records(), indent=1) + "\n")
    elif fmt == OutFormat.jsonl:
        for r in result.records():
            sys.stdout.write(json.dumps(r) + "\n")
    elif fmt == OutFormat.csv:
        result.to_pandas().to_csv(sys.stdout, index=False)
    else:
        raise InvalidInputError("--format parquet needs --output PATH")


@app.command()
def init(
    store: StoreArg,
    train_ids: Annotated[Path, typer.Option("--train-ids", help="Train ids: text (one per line), CSV or parquet [FILE:COLUMN].")],
    query_set: Annotated[list[str], typer.Option("--query-set", help="NAME=FILE with that query set's ids; repeatable.")] = [],
    seed: Annotated[int, typer.Option(help="Store seed; perturbation k is seeded from (seed, k).")] = 0,
    capacity: Annotated[int, typer.Option(help="Maximum number of perturbation columns.")] = 1 << 16,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk.")] = 1 << 18,
    storage_options: StorageOpt = None,
) -> None:
    """Create an empty store from train ids (and query sets)."""
    try:
        sets = {name: read_ids(path) for name, path in _parse_pairs(query_set, "--query-set").items()}
        s = daunce_store.init(
            store, read_ids(train_ids), sets, seed=seed, capacity=capacity, chunk_rows=chunk_rows,
            storage_options=_storage_options(storage_options),
        )
    except DaunceStoreError as e:
        _fail(e)
    console.print(f"created {s.url}: n_train={s.n_train}, query sets {s.query_sets()}")


@app.command("add-queries")
def add_queries(
    store: StoreArg,
    query_set: Annotated[list[str], typer.Option("--query-set", help="NAME=FILE with the new query set's ids; repeatable.")],
    storage_options: StorageOpt = None,
) -> None:
    """Add query sets to an existing store."""
    try:
        s = _open(store, "a", storage_options)
        for name, path in _parse_pairs(query_set, "--query-set").items():
            s.add_query_set(name, read_ids(path))
    except DaunceStoreError as e:
        _fail(e)
    console.print(f"query sets now: {s.query_sets()}")


@app.command()
def append(
    store: StoreArg,
    perturbation: Annotated[str, typer.Option("--perturbation", help="Perturbation id (unique per column).")],
    train: Annotated[Path, typer.Option("--train", help="Train losses, one per train id in order (.npy, .parquet, .csv).")],
    query: Annotated[list[str], typer.Option("--query", help="NAME=FILE losses for a query set; repeatable.")] = [],
    metadata: Annotated[Optional[str], typer.Option(help="JSON object kept in the commit record.")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Append one perturbation's loss column computed anywhere (e.g. a black-box fine-tuning API)."""
    try:
        meta = json.loads(metadata) if metadata else {}
        if not isinstance(meta, dict):
            raise InvalidInputError("--metadata must be a JSON object")
        s = _open(store, "a", storage_options)
        queries = {name: read_losses(path) for name, path in _parse_pairs(query, "--query").items()}
        commit = s.append(perturbation, read_losses(train), queries, metadata={"source": "append", **meta})
    except json.JSONDecodeError as e:
        _fail(InvalidInputError(f"--metadata is not valid JSON: {e}"))
    except DaunceStoreError as e:
        _fail(e)
    console.print(f"committed {commit.perturbation!r} in slot {commit.slot} (K={s.num_columns()})")


@app.command()
def status(
    store: StoreArg,
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    storage_options: StorageOpt = None,
) -> None:
    """Sizes, committed columns, leases in flight, size on disk, format version."""
    try:
        info = _open(store, "r", storage_options).status()
    except DaunceStoreError as e:
        _fail(e)
    if format == "json":
        sys.stdout.write(json.dumps(info, indent=1) + "\n")
        return
    table = Table(title=f"daunce store {info['url']}", show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


@app.command()
def topk(
    store: StoreArg,
    query_set: Annotated[str, typer.Option("--query-set", help="Query set name.")],
    query: Annotated[list[str], typer.Option("--query", help="Query id; repeatable (default: all).")] = [],
    k: Annotated[int, typer.Option("-k", help="How many train examples per query and side.")] = 10,
    measure: Annotated[Measure, typer.Option(help="cov or corr.")] = Measure.cov,
    side: Annotated[Side, typer.Option(help="pos (proponents), neg (opponents) or both.")] = Side.both,
    backend: Annotated[Backend, typer.Option(help="Scoring backend.")] = Backend.auto,
    format: Annotated[OutFormat, typer.Option("--format")] = OutFormat.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to a file instead.")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Top-k proponents and opponents per query."""
    try:
        s = _open(store, "r", storage_options)
        result = s.topk(query_set, query or None, k=k, measure=measure.value, side=side.value, backend=backend.value)
        _emit(result, format, output, f"top-{k} for {query_set}")
    except DaunceStoreError as e:
        _fail(e)


@app.command()
def influence(
    store: StoreArg,
    query_set: Annotated[str, typer.Option("--query-set", help="Query set name.")],
    query: Annotated[list[str], typer.Option("--query", help="Restrict to these query ids; repeatable.")] = [],
    k: Annotated[int, typer.Option("-k")] = 10,
    measure: Annotated[Measure, typer.Option()] = Measure.cov,
    side: Annotated[Side, typer.Option()] = Side.both,
    backend: Annotated[Backend, typer.Option()] = Backend.auto,
    format: Annotated[OutFormat, typer.Option("--format")] = OutFormat.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Aggregate influence of each train example on a whole query set (mean score), top-k."""
    try:
        s = _open(store, "r", storage_options)
        result = s.influence(query_set, query or None, k=k, measure=measure.value, side=side.value, backend=backend.value)
        _emit(result, format, output, f"influence on {query_set}")
    except DaunceStoreError as e:
        _fail(e)


@app.command("self-influence")
def self_influence(
    store: StoreArg,
    k: Annotated[int, typer.Option("-k")] = 10,
    side: Annotated[Side, typer.Option(help="pos: highest variance (mislabels, outliers).")] = Side.pos,
    format: Annotated[OutFormat, typer.Option("--format")] = OutFormat.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Self-influence (loss variance across perturbations): mislabel and outlier search."""
    try:
        result = _open(store, "r", storage_options).self_influence(k=k, side=side.value)
        _emit(result, format, output, "self-influence")
    except DaunceStoreError as e:
        _fail(e)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its store and pictures.")] = Path("daunce-demo"),
    k_perturbations: Annotated[int, typer.Option("--perturbations", "-K", help="Number of perturbed models.")] = 32,
) -> None:
    """End-to-end run on scikit-learn's bundled digits: perturb, store, score, show."""
    from daunce_store.demo import run_demo

    try:
        run_demo(workdir, k_perturbations, console)
    except DaunceStoreError as e:
        _fail(e)


if __name__ == "__main__":  # pragma: no cover
    app()
