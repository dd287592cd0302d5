"""The ``daunce`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional


import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import daunce_store
from daunce_store._constants import L2Center
from daunce_store._select import Remove, Write
from daunce_store.errors import DaunceStoreError, InvalidInputError
from daunce_store.scoring import DEFAULT_MEASURE, MEASURE_HELP, MEASURE_NAMES, TOPK_MEASURE, Attribution, BackendChoice, SideChoice
from daunce_store.serve._work import DEFAULT_MAX_WORK
from daunce_store.store import (DEFAULT_GRACE_SECONDS, DataFile, ExportForm, OpenMode, TableFormat, append_query_matrix, data_file_specs, dumps_json, iso, read_data_file,
                                read_ids, read_losses)

app = typer.Typer(
    name="daunce",
    help="Training-data attribution by Daunce: perturb, store loss columns, score top-k influences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _text(*parts: Any) -> Text:
    """What the CLI prints, as rich Text: ids, names, paths and messages print as they are and are never
    read as markup (a str given to rich is markup: an id ``[b]t1`` would print as a bold ``t1`` and one
    holding ``[/]`` would raise MarkupError). A ``(text, style)`` part is printed in that style."""
    return Text.assemble(*(p if isinstance(p, tuple) else str(p) for p in parts))

StoreArg = Annotated[str, typer.Argument(help="Store path or URL (s3://bucket/prefix, ...).")]


# Every choice comes from the library's own vocabulary (measures, sides, backends, formats): typer reads a
# Literal's values as the choices, and the value passed on is the plain string.
if TYPE_CHECKING:
    MeasureName = str
else:  # the measures are a registry read at import, not a Literal written in the code: typer sees their names
    MeasureName = Literal[MEASURE_NAMES]
MEASURE_OPTION_HELP = f"Score measure. {MEASURE_HELP}."
OutFormat = Literal["table", TableFormat]
ReportFormat = Literal["table", "json"]  # status, leases, stability


# Options shared by the scoring commands: one definition each.
QuerySetOpt = Annotated[str, typer.Option("--query-set", help="Query set name.")]
QueryIdsOpt = Annotated[list[str], typer.Option("--query", help="Query id; repeatable (default: the whole set).")]
KOpt = Annotated[int, typer.Option("-k", help="How many train examples per query and side.")]
MeasureOpt = Annotated[MeasureName, typer.Option(help=MEASURE_OPTION_HELP)]
SideOpt = Annotated[SideChoice, typer.Option(help="pos (proponents), neg (opponents) or both.")]
BackendOpt = Annotated[BackendChoice, typer.Option(help="Scoring backend (every backend gives the same answer).")]
FormatOpt = Annotated[OutFormat, typer.Option("--format", help="table, or json, jsonl, csv, parquet (parquet needs --output).")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to a file instead.")]
SchedulerOpt = Annotated[
    Optional[str],
    typer.Option("--scheduler", help="Score on a Dask cluster: its scheduler's address, tcp://HOST:PORT (needs the dask extra; same answer)."),
]


def _fail(err: Exception) -> None:
    # soft_wrap: one line however long (a log greps it whole; the terminal folds it for the eye)
    err_console.print(_text(("error:", "bold red"), f" {err}"), soft_wrap=True)
    raise typer.Exit(code=2)


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings as one yellow line naming their class (not Python's file:line form; soft_wrap: never cut into
    lines, the terminal folds it)."""
    err_console.print(_text((f"warning ({category.__name__}):", "bold yellow"), f" {message}"), soft_wrap=True)


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


def _json_object(text: Optional[str], option: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{option} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object")
    return value


def _storage_options(options: Optional[str]) -> dict[str, Any] | None:
    return _json_object(options, "--storage-options")


def _training_extra(command: str) -> Any:
    """daunce_store.perturb, or a clear error naming the extra it needs."""
    try:
        import daunce_store.perturb as perturb
    except ImportError as e:
        raise InvalidInputError(f"{e}; `{command}` needs the training extra: pip install 'daunce-store[train]'") from None
    return perturb


def _command(on: typer.Typer, name: Optional[str] = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command; any DaunceStoreError it raises becomes one red line and exit code 2, and each
    warning one yellow line."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)  # typer reads the wrapped signature
        def run(*args: Any, **kwargs: Any) -> None:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                try:
                    fn(*args, **kwargs)
                except DaunceStoreError as e:
                    _fail(e)

        return on.command(name)(run)

    return register


StorageOpt = Annotated[
    Optional[str],
    typer.Option("--storage-options", help='JSON for the object store, e.g. \'{"endpoint": "http://127.0.0.1:9000"}\'.'),
]


def _open(store: str, mode: OpenMode, storage_options: Optional[str]) -> daunce_store.Store:
    return daunce_store.open(store, mode=mode, storage_options=_storage_options(storage_options))


DataOpt = Annotated[
    list[str],
    typer.Option("--data", help="Show the examples' content beside their ids (and add its columns to json/csv/parquet): FILE "
                 "(the train data) or NAME=FILE (query set NAME, for topk); .jsonl/.ndjson, .json, .csv, .tsv, .parquet, rows "
                 "matched by an `id` column, else by row number; repeatable. A recipe store remembers its files."),
]
TEXT_WIDTH = 60  # characters of a data value in the table (json, csv and parquet hold it whole)


def _example_files(s: daunce_store.Store, specs: list[str], query_set: Optional[str]) -> tuple[Optional[DataFile], Optional[DataFile]]:
    """The train data file and ``query_set``'s (None: not wanted): from --data, else the files a recipe store
    was built from; a remembered file that is gone is a warning, and the ids show alone."""
    given = data_file_specs(specs)
    for key, file in given.items():
        if key not in ("train", query_set):
            wanted = f"only {query_set}=FILE names a query set here" if query_set else "this command lists train examples only"
            raise InvalidInputError(f"--data {key}={file}: {wanted}; give the train data as --data FILE")
    remembered = s.data_files() if len(given) < (2 if query_set else 1) else {}
    out: list[Optional[DataFile]] = []
    for name in ("train", query_set):
        path = given.get(name) if name else None
        if name and path is None and name in remembered:
            path = remembered[name]
            if not Path(path).exists():
                what = "train data" if name == "train" else f"query set {name!r}'s data"
                warnings.warn(f"the {what} this store was made from, {path}, no longer exists; showing ids only "
                              f"(give its new place: --data {'' if name == 'train' else name + '='}FILE)", stacklevel=2)
                path = None
        out.append(read_data_file(path, dataset_dir=True) if path else None)
    return out[0], out[1]


def _short(value: Any) -> str:
    """A data value for a table cell: one line, at most TEXT_WIDTH characters."""
    text = value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + "…"


def _emit(result: Attribution, fmt: OutFormat, output: Optional[Path], title: str) -> None:
    if fmt == "table" and output is None:
        data = result.data_columns()
        query_cols = [c for c in data if c.startswith("query_")]
        train_cols = [c for c in data if c not in query_cols]
        columns = ["query", *query_cols, "side", "rank", "train_id", *train_cols, "train_index", "score"]
        table = Table(title=_text(f"{title} ({result.measure}, K={result.num_columns})"))
        for col in columns:
            table.add_column(col, justify="right" if col in ("rank", "train_index", "score") else "left")
        shown_query = None
        for r in result.records():
            cells = {**r, "score": f"{r['score']:.4g}"}
            for col in data:
                # a query's own content once, on its first row
                cells[col] = "" if col in query_cols and r["query"] == shown_query else _short(r[col])
            shown_query = r["query"]
            table.add_row(*(_text(cells[col]) for col in columns))
        console.print(table)
    elif output is not None:
        result.write(output, None if fmt == "table" else fmt)
        err_console.print(_text(f"wrote {len(result.records())} records to {output}"))
    else:
        result.write(sys.stdout, fmt)


@_command(app)
def init(
    store: StoreArg,
    train_ids: Annotated[Path, typer.Option("--train-ids", help="Train ids: text (one per line), CSV or parquet [FILE:COLUMN].")],
    query_set: Annotated[list[str], typer.Option("--query-set", help="NAME=FILE with that query set's ids; repeatable.")] = [],
    seed: Annotated[int, typer.Option(help="Store seed; perturbation k is seeded from (seed, k).")] = 0,
    capacity: Annotated[int, typer.Option(help="Maximum number of perturbation columns.")] = 1 << 16,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk.")] = 1 << 18,
    pack_width: Annotated[Optional[int], typer.Option(help="Columns per wide chunk made by `daunce compact` (default min(64, capacity)).")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Create an empty store from train ids (and query sets)."""
    sets = {name: read_ids(path) for name, path in _parse_pairs(query_set, "--query-set").items()}
    s = daunce_store.init(
        store, read_ids(train_ids), sets, seed=seed, capacity=capacity, chunk_rows=chunk_rows, pack_width=pack_width,
        storage_options=_storage_options(storage_options),
    )
    console.print(_text(f"created {s.url}: n_train={s.n_train}, query sets {s.query_sets()}"))


@_command(app, "add-queries")
def add_queries(
    store: StoreArg,
    queries: Annotated[list[str], typer.Option("--queries", help="NAME=DATA_FILE: a new query set of examples (the run's fields) for a recipe store, evaluated at once under its kept adapters; repeatable.")] = [],
    query_set: Annotated[list[str], typer.Option("--query-set", help="NAME=FILE with the new query set's ids; repeatable.")] = [],
    config: Annotated[Optional[Path], typer.Option("--config", help="With --query-set: the perturb run's YAML; evaluate the new sets under its stored adapters.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Torch device for the evaluation (cpu, cuda, cuda:1).")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Add query sets to an existing store: examples from data files, evaluated under a recipe store's kept
    adapters (--queries); or ids (--query-set), filled later with `append-queries`, or at once from a
    factory run's stored adapters (--config). A refusal registers nothing."""
    if bool(queries) == bool(query_set):
        raise InvalidInputError("give --queries NAME=DATA_FILE (a recipe store) or --query-set NAME=IDS_FILE, one of them")
    if queries and config is not None:
        raise InvalidInputError("--config goes with --query-set; a recipe store's --queries need no config (the commits hold the recipe)")
    s = _open(store, "a", storage_options)
    if queries:
        perturb = _training_extra("daunce add-queries --queries")
        filled = perturb.add_query_data(s, _parse_pairs(queries, "--queries"), device=device or "cpu")
        for name, (n, k) in filled.items():
            console.print(_text(f"{name}: {n} examples, losses under {k} kept adapters"))
        console.print(_text(f"query sets now: {s.query_sets()}"))
        return
    pairs = _parse_pairs(query_set, "--query-set")
    # Every input is read and checked before the first write: a bad file leaves the store unchanged.
    sets = {name: read_ids(path) for name, path in pairs.items()}
    if config is not None:
        perturb = _training_extra("daunce add-queries --config")
        cfg = perturb.PerturbConfig.from_yaml(config)
        filled = perturb.fill_query_sets(store, cfg, sets, device=device,
                                         storage_options=_storage_options(storage_options), base_dir=config.parent)
        for name, ids in filled.items():
            console.print(_text(f"{name}: losses under {len(ids)} stored perturbations"))
    else:
        for name, ids in sets.items():
            s.add_query_set(name, ids)
    console.print(_text(f"query sets now: {s.query_sets()}"))


@_command(app)
def append(
    store: StoreArg,
    perturbation: Annotated[Optional[str], typer.Option("--perturbation", help="Perturbation id (unique per column).")] = None,
    train: Annotated[Optional[Path], typer.Option("--train", help="Train losses, one per train id in order (.npy, .parquet, .csv).")] = None,
    query: Annotated[list[str], typer.Option("--query", help="NAME=FILE losses for a query set; repeatable.")] = [],
    matrix: Annotated[Optional[Path], typer.Option("--matrix", help="Many columns at once instead: .parquet/.csv with `set` (optional), `id`, one column per perturbation id; or .npz (ids, perturbations, train, query_ids__SET, query__SET).")] = None,
    metadata: Annotated[Optional[str], typer.Option(help="JSON object kept in the commit record.")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Append loss columns computed anywhere (e.g. a black-box fine-tuning API): one, or a matrix of them."""
    meta = _json_object(metadata, "--metadata") or {}
    if matrix is not None:
        if perturbation is not None or train is not None or query:
            raise InvalidInputError("--matrix holds the perturbation ids and every set's losses; drop --perturbation, --train and --query")
        s = _open(store, "a", storage_options)
        commits = s.append_matrix(matrix, metadata=meta)
        names = ", ".join(c.perturbation for c in commits[:8]) + (", ..." if len(commits) > 8 else "")
        console.print(_text(f"committed {len(commits)} perturbations ({names}) (K={s.num_columns()})"))
        return
    if perturbation is None or train is None:
        raise InvalidInputError("give --perturbation and --train (one column), or --matrix FILE (many)")
    s = _open(store, "a", storage_options)
    sizes = s.query_sets()  # each file's .npy header is checked against its set's size before it is read
    queries = {name: read_losses(path, sizes.get(name)) for name, path in _parse_pairs(query, "--query").items()}
    commit = s.append(perturbation, read_losses(train, s.n_train), queries, metadata={"source": "append", **meta})
    console.print(_text(f"committed {commit.perturbation!r} in slot {commit.slot} (K={s.num_columns()})"))


@_command(app, "append-queries")
def append_queries(
    store: StoreArg,
    query_set: Annotated[str, typer.Option("--query-set", help="The query set to fill (added with `daunce add-queries`).")],
    matrix: Annotated[Path, typer.Option("--matrix", help="Its losses: .parquet/.csv with `id` and one column per committed perturbation id (rows in any order), or .npz (perturbations, query_ids__SET, query__SET).")],
    storage_options: StorageOpt = None,
) -> None:
    """Fill a query set's losses for already committed columns (black-box runs evaluated on a later set)."""
    s = _open(store, "a", storage_options)
    filled = append_query_matrix(s, query_set, matrix)
    columns = s.snapshot().query_slots.get(query_set, ())
    console.print(_text(f"{query_set}: losses for {len(filled)} perturbations added ({len(columns)} of {s.num_columns()} columns have them)"))


@_command(app)
def perturb(
    store: StoreArg,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML perturbation config (PerturbConfig fields; `factory` names the model). With --recipe: the training settings only.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker processes (spawned) sharing the work through leases.")] = 1,
    device: Annotated[Optional[str], typer.Option("--device", help="Torch device: cpu, cuda, cuda:1 (overrides the config).")] = None,
    until: Annotated[Optional[int], typer.Option("--until", "-K", help="K: run until perturbations 0..K-1 are committed (overrides num_perturbations).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    compact: Annotated[bool, typer.Option("--compact/--no-compact", help="Afterwards, pack full groups of committed columns into wide chunks for fast scans.")] = True,
    storage_options: StorageOpt = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="causal-lm or classifier: the model and data come from --model, --train, --queries (no factory); the store is created from the data's ids.", rich_help_panel="Recipe")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="A Hugging Face model directory or a .gguf file.", rich_help_panel="Recipe")] = None,
    train: Annotated[Optional[Path], typer.Option("--train", help="Training data: .jsonl, .json, .parquet, .csv, .tsv or a saved `datasets` directory; ids from an `id` column, else row numbers.", rich_help_panel="Recipe")] = None,
    queries: Annotated[list[str], typer.Option("--queries", help="A query set, NAME=FILE; repeatable.", rich_help_panel="Recipe")] = [],
    prompt_field: Annotated[Optional[str], typer.Option("--prompt-field", help="causal-lm: prompt field (default prompt; rows with `messages` instead are chats, the last assistant turn the completion).", rich_help_panel="Recipe")] = None,
    completion_field: Annotated[Optional[str], typer.Option("--completion-field", help="causal-lm: completion field (default completion).", rich_help_panel="Recipe")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="classifier: text field (default text).", rich_help_panel="Recipe")] = None,
    label_field: Annotated[Optional[str], typer.Option("--label-field", help="classifier: label field (default label; class indices or names from the model's label2id).", rich_help_panel="Recipe")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Truncate each example to this many tokens.", rich_help_panel="Recipe")] = None,
    train_layers: Annotated[Optional[int], typer.Option("--train-layers", help="causal-lm fast path: LoRA on the last L decoder layers, θ0's hidden states below them computed once and cached (default 2).", rich_help_panel="Recipe")] = None,
    full_model: Annotated[bool, typer.Option("--full-model", help="causal-lm: opt out of the fast path; every step and evaluation runs all layers.", rich_help_panel="Recipe")] = False,
    lora: Annotated[Optional[bool], typer.Option("--lora/--no-lora", help="LoRA adapters (the config's, or r 64, alpha 16 on the MLP projections) or a full fine-tune (overrides the config).", rich_help_panel="Training")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (overrides the config).", rich_help_panel="Training")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps per perturbation (overrides the config).", rich_help_panel="Training")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size (overrides the config).", rich_help_panel="Training")] = None,
    l2_center: Annotated[Optional[L2Center], typer.Option("--l2-center", help="Centre of the L2 term of the IF and Fisher objectives: zero (λ/2‖θ‖², the target's regulariser; the default) or theta0 (λ/2‖θ−θ0‖², whose unperturbed optimum is θ0: no shared drift). Overrides the config.", rich_help_panel="Training")] = None,
) -> None:
    """Fine-tune perturbed copies of the model and append their loss columns (needs the train extra)."""
    recipe_options = {"model": model, "train": train, "prompt_field": prompt_field, "completion_field": completion_field,
                      "text_field": text_field, "label_field": label_field, "max_length": max_length, "train_layers": train_layers}
    given = [f"--{k.replace('_', '-')}" for k, v in recipe_options.items() if v is not None] + (["--queries"] if queries else []) \
        + (["--full-model"] if full_model else [])
    if recipe is None and given:
        raise InvalidInputError(f"{', '.join(given)} need --recipe causal-lm|classifier")
    perturb = _training_extra("daunce perturb")
    cfg = perturb.load_config(config, recipe, overrides={"lr": lr, "max_steps": max_steps, "batch_size": batch_size,
                                                                "l2_center": l2_center}, lora=lora)
    if recipe is not None:
        options: dict[str, Any] = {k: v for k, v in recipe_options.items() if v is not None}
        if queries:
            options["queries"] = _parse_pairs(queries, "--queries")
        cfg = perturb.prepare_recipe(store, recipe, options, cfg, until=until, storage_options=_storage_options(storage_options),
                                     full_model=full_model, say=lambda line: err_console.print(_text(line)))
    done = perturb.run_workers(store, cfg, until=until, workers=workers, device=device, base_dir=config.parent if config else None,
                               storage_options=_storage_options(storage_options), console=err_console, progress=progress)
    s = _open(store, "a", storage_options)
    if compact:  # safe beside other workers still appending; packs only full groups
        s.compact()
    console.print(_text(f"{done} of {until or cfg.num_perturbations} perturbations committed in {store}"))
    kept = s.adapter_sizes()
    if kept:
        total = sum(kept.values())
        console.print(_text(f"kept {len(kept)} {'LoRA adapters' if cfg.lora_settings() is not None else 'weight sets'} "
                            f"({total / len(kept) / 1e6:.1f} MB each, {total / 1e6:.1f} MB in all) for `daunce attribute` and `daunce add-queries`"))


@_command(app)
def status(
    store: StoreArg,
    format: Annotated[ReportFormat, typer.Option("--format", help="table or json")] = "table",
    storage_options: StorageOpt = None,
) -> None:
    """Sizes, committed columns, leases in flight, size on disk, format version."""
    info = _open(store, "r", storage_options).status()
    if format == "json":
        sys.stdout.write(json.dumps(info, indent=1) + "\n")
        return
    table = Table(title=_text(f"daunce store {info['url']}"), show_header=False)
    for key, value in info.items():
        table.add_row(_text(key), _text(json.dumps(value) if isinstance(value, (dict, list)) else value))
    console.print(table)


@_command(app)
def compact(store: StoreArg, storage_options: StorageOpt = None) -> None:
    """Pack committed columns into wide row-block chunks (faster scans), and persist the default measure's
    K x K matrices (one pass each where missing); safe while workers append."""
    s = _open(store, "a", storage_options)
    groups = s.compact()
    info = s.status()
    console.print(
        f"packed {len(groups)} new group(s) of {s.pack_width} columns; "
        f"{info['packed_columns']} of {info['committed_columns']} committed columns are packed"
    )
    # The default measures' K x K matrices, persisted here because scoring commands open the store read-only.
    try:
        sets = s.persist_matrices()
    except DaunceStoreError as e:  # losses the default measure cannot score: said when scoring, not a compaction error
        err_console.print(_text(f"the default measure's K x K matrices were not persisted: {e}"))
    else:
        if sets:
            console.print(f"the default measure's K x K matrices are persisted for {len(sets)} column set(s)")


@_command(app)
def leases(
    store: StoreArg,
    release: Annotated[list[str], typer.Option("--release", help="Release this perturbation's lease by hand (its worker is dead); repeatable.")] = [],
    format: Annotated[ReportFormat, typer.Option("--format", help="table or json")] = "table",
    storage_options: StorageOpt = None,
) -> None:
    """Leases of uncommitted perturbations: live, expired, holder-gone (its process on this host exited) or
    released; --release frees one at once."""
    s = _open(store, "a" if release else "r", storage_options)
    for pid in release:
        was = s.force_release(pid)
        note = {"live": f"it was live: worker {was['worker']!r} loses it at its next renewal",
                "expired": "it had expired", "holder-gone": "its holder's process had exited"}[was["state"]]
        err_console.print(_text(f"released the lease on {was['perturbation']!r} held by worker {was['worker']!r} ({note}); "
                                "any worker may claim it now"))
    now = time.time()
    rows = [
        {"perturbation": r["perturbation"], "worker": r["worker"], "host": r.get("host"), "pid": r.get("pid"),
         "expires": None if r.get("released") else iso(r["expires_at"]),
         "seconds_left": None if r.get("released") else round(r["expires_at"] - now, 1), "state": r["state"]}
        for r in s.lease_table()
    ]
    if format == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    table = Table(title=_text(f"leases of uncommitted perturbations in {s.url}"), caption=None if rows else "no leases")
    for col in ("perturbation", "worker", "host", "pid", "expires", "seconds_left", "state"):
        table.add_column(col, justify="right" if col in ("pid", "seconds_left") else "left")
    for r in rows:
        table.add_row(*(_text("" if v is None else v) for v in r.values()))
    console.print(table)


GraceOpt = Annotated[float, typer.Option("--grace", help="Only leftovers older than this many seconds (a live writer is never older).")]


@_command(app)
def verify(
    store: StoreArg,
    format: Annotated[ReportFormat, typer.Option("--format", help="table or json")] = "table",
    grace: GraceOpt = DEFAULT_GRACE_SECONDS,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
    storage_options: StorageOpt = None,
) -> None:
    """Check the store (fsck): every committed chunk present, checksummed and finite, packed copies equal
    their columns, ids intact, records consistent; list what `daunce gc` can reclaim. Exit 1 on damage."""
    report = _open(store, "r", storage_options).verify(grace_seconds=grace, progress=progress)
    if format == "json":
        sys.stdout.write(json.dumps({"url": report.url, "ok": report.ok, "checked": report.checked,
                                     "findings": [f.record() for f in report.findings]}, indent=1) + "\n")
    else:
        if report.findings:
            table = Table(title=_text(f"findings in {report.url}"))
            for col in ("kind", "what", "key", "message"):
                table.add_column(col, overflow="fold")
            for f in report.findings:
                style = {"damage": "bold red", "reclaimable": "yellow"}.get(f.kind, "")
                table.add_row(_text((f.kind, style)), *map(_text, (f.what, f.key, f.message)))
            console.print(table)
        checked = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.checked.items())
        verdict = ("ok", "green") if report.ok else (f"{report.count('damage')} damaged", "bold red")
        console.print(_text(verdict, f": checked {checked}; {report.count('reclaimable')} reclaimable by `daunce gc`, {report.count('note')} notes"))
    if not report.ok:
        raise typer.Exit(code=1)


@_command(app)
def gc(
    store: StoreArg,
    grace: GraceOpt = DEFAULT_GRACE_SECONDS,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be reclaimed.")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Reclaim space: packed columns' own chunks, slots leaked by killed writers, orphaned or duplicate pack
    groups (all past --grace, on the storage's clock), and complete commits whose writer stopped after deciding;
    decided by records alone, so committed columns are safe beside live writers, compactors and readers."""
    r = _open(store, "a", storage_options).gc(grace_seconds=grace, dry_run=dry_run)
    verb = "would reclaim" if dry_run else "reclaimed"
    console.print(_text(f"{verb} the own chunks of {len(r.packed_slots)} packed column(s), {len(r.slots)} leaked slot(s) {r.slots[:10]} "
                        f"and {len(r.groups)} pack group(s) {r.groups[:10]}"
                        + ("" if dry_run else f": {r.chunks_deleted} chunks, {r.bytes_freed} bytes")))
    for line in r.completed:
        console.print(_text(f"completed the {line} (decided by its writer, which stopped before recording it)"))
    for line in r.skipped:
        err_console.print(_text(f"skipped {line}"))


@_command(app)
def export(
    store: StoreArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.parquet, FILE.csv or FILE.jsonl.")],
    form: Annotated[ExportForm, typer.Option(help="wide: set, id, one column per perturbation; long: set, id, perturbation, loss.")] = "wide",
    storage_options: StorageOpt = None,
) -> None:
    """Export the train and query loss matrices, with ids, to parquet, csv or jsonl."""
    rows = _open(store, "r", storage_options).export(output, form=form)
    err_console.print(_text(f"wrote {rows} rows ({form} form) to {output}"))


def _ranking_command(name: str, aggregate: bool, default_measure: str, doc: str) -> None:
    """`topk` and `influence`: the same options, per query or for the mean over the queries."""

    def command(
        store: StoreArg,
        query_set: QuerySetOpt,
        query: QueryIdsOpt = [],
        k: KOpt = 10,
        measure: MeasureOpt = default_measure,
        side: SideOpt = "both",
        backend: BackendOpt = "auto",
        format: FormatOpt = "table",
        output: OutputOpt = None,
        data: DataOpt = [],
        storage_options: StorageOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        s = _open(store, "r", storage_options)
        train, queries = _example_files(s, data, None if aggregate else query_set)  # a bad file fails before the scan
        rank = s.influence if aggregate else s.topk
        result = rank(query_set, query or None, k=k, measure=measure, side=side, backend=backend,
                      client=scheduler)
        _emit(result.with_data(train, queries), format, output, f"influence on {query_set}" if aggregate else f"top-{k} for {query_set}")

    command.__doc__ = doc
    command.__name__ = name
    _command(app, name)(command)


_ranking_command("topk", False, TOPK_MEASURE, "Top-k proponents and opponents per query, to read (default measure auto-corr: "
                 "the same high-leverage rows do not head unrelated queries' lists; see bench/RESULTS.md).")
_ranking_command("influence", True, DEFAULT_MEASURE, "Aggregate influence of each train example on a whole query set (mean "
                 "score), top-k, for curation (default measure auto: the best LDS).")


@_command(app, "scores")
def scores_command(
    store: StoreArg,
    query_set: QuerySetOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.parquet, .csv, .jsonl or .json.")],
    query: QueryIdsOpt = [],
    measure: MeasureOpt = DEFAULT_MEASURE,
    mean: Annotated[bool, typer.Option("--mean", help="One column: the mean score over the queries.")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Dense scores: one row per train example, one column per query (or their mean), streamed to a file."""
    s = _open(store, "r", storage_options)
    result = s.scores(query_set, query or None, measure=measure, aggregate="mean" if mean else None)
    rows = result.write(output)
    err_console.print(_text(f"wrote {rows} rows x {len(result.queries)} queries ({result.measure}, K={result.num_columns}) to {output}"))


@_command(app, "select")
def select_command(
    store: StoreArg,
    query_set: QuerySetOpt,
    top: Annotated[int, typer.Option("--top", "-n", help="How many train examples to remove.")],
    remove: Annotated[Remove, typer.Option(help="harmful: the top opponents (removing them should lower the query set's loss); helpful: the top proponents (should raise it).")] = "harmful",
    data: Annotated[Optional[Path], typer.Option("--data", help="The training data (.jsonl/.ndjson, .json, .csv, .tsv, .parquet); rows matched to the store's train ids by an `id` column, else by row number.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the selected rows, in the data file's format (needs --data).")] = None,
    write: Annotated[Write, typer.Option("--write", help="Write the kept rows (data order) or the removed ones (rank order).")] = "kept",
    ids_output: Annotated[Optional[Path], typer.Option("--ids-output", help="The written rows' ids, one per line (default with --output: OUTPUT.ids.txt).")] = None,
    query: QueryIdsOpt = [],
    measure: MeasureOpt = DEFAULT_MEASURE,
    backend: BackendOpt = "auto",
    storage_options: StorageOpt = None,
) -> None:
    """Remove the training examples most harmful (or helpful) to a query set, ranked by aggregate influence,
    and write the kept (or removed) rows of the data file in its own format."""
    if data is not None and output is None:
        raise InvalidInputError("--data needs --output FILE (same format as the data file) to write the selected rows")
    s = _open(store, "r", storage_options)
    sel = s.select(query_set, query or None, remove=remove, top=top, measure=measure, write=write,
                   data=data, output=output, ids_output=ids_output, backend=backend)
    table = Table(title=_text(f"removed: top-{top} {remove} for {query_set} ({sel.measure}, K={sel.num_columns})"))
    for col in ("rank", "train_id", "score"):
        table.add_column(col, justify="left" if col == "train_id" else "right")
    shown = min(len(sel.removed_ids), 20)
    for r in range(shown):
        table.add_row(_text(r + 1), _text(sel.removed_ids[r]), _text(f"{sel.removed_scores[r]:.4g}"))
    if shown < len(sel.removed_ids):
        table.caption = f"... {len(sel.removed_ids) - shown} more"
    console.print(table)
    wrong = sum(1 for v in sel.removed_scores if (v > 0 if remove == "harmful" else v < 0))
    if wrong:
        err_console.print(_text(f"note: {wrong} of the {top} removed examples have a score of the other sign "
                                f"(fewer than {top} train examples are {remove} to {query_set})"))
    if output is not None:
        err_console.print(_text(f"wrote {len(sel.written_ids)} {write} rows to {output}"))
    written_ids = ids_output or (output.with_name(output.name + ".ids.txt") if output is not None else None)
    if written_ids is not None:
        err_console.print(_text(f"wrote their {len(sel.written_ids)} ids to {written_ids}"))


@_command(app, "check-removal")
def check_removal_command(
    store: StoreArg,
    query_set: QuerySetOpt,
    config: Annotated[Optional[Path], typer.Option("--config", help="The perturb run's YAML: its factory gives the model θ0, the data and the query set; its fine-tune settings are used. A store made by `daunce perturb --recipe` needs none: the recipe is read from its commits.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many train examples to remove.")] = 20,
    remove: Annotated[Remove, typer.Option(help="helpful: the top proponents (the loss should rise); harmful: the top opponents (it should fall).")] = "helpful",
    seeds: Annotated[int, typer.Option("--seeds", help="Fine-tune seeds, each with its own random removal (the report gives the mean ± spread over them).")] = 3,
    measure: MeasureOpt = DEFAULT_MEASURE,
    device: Annotated[Optional[str], typer.Option("--device", help="Torch device (overrides the config).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
    storage_options: StorageOpt = None,
) -> None:
    """Do the scores hold on your data? Remove the top-k helpful (or harmful) examples, fine-tune θ0 on the
    rest, and compare the query set's loss change with removing k random examples (needs the train extra)."""
    perturb = _training_extra("daunce check-removal")
    from daunce_store.evaluation.removal import check_removal, recipe_config

    s = _open(store, "r", storage_options)
    cfg = perturb.PerturbConfig.from_yaml(config) if config is not None else recipe_config(s)
    r = check_removal(s, cfg, query_set, k=k, remove=remove, seeds=seeds, measure=measure,
                      base_dir=config.parent if config is not None else None, device=device, progress=progress)
    _rows_table(f"check-removal on {query_set}: top-{k} {remove} vs {k} random ({r.measure}, K={r.num_columns}); "
                "Δ = change of the mean query loss against fine-tuning on everything", r.rows())
    console.print(_text(r.summary()))


@_command(app)
def stability(
    store: StoreArg,
    query_set: QuerySetOpt,
    query: QueryIdsOpt = [],
    k: KOpt = 10,
    measure: MeasureOpt = DEFAULT_MEASURE,
    side: SideOpt = "both",
    fraction: Annotated[list[float], typer.Option("--fraction", help="Column fraction; repeatable.")] = [0.25, 0.5, 1.0],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the columns (0: none).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the resamples.")] = 0,
    backend: BackendOpt = "auto",
    format: Annotated[ReportFormat, typer.Option("--format")] = "table",
    storage_options: StorageOpt = None,
) -> None:
    """Has K converged? Top-k overlap with the full-K list over nested column subsets, and bootstrap
    standard errors of the listed scores."""
    s = _open(store, "r", storage_options)
    result = s.stability(query_set, query or None, k=k, measure=measure, side=side,
                         fractions=tuple(fraction), bootstrap=bootstrap, seed=seed, backend=backend)
    if format == "json":
        # Strict JSON: NaN ("not computed": no bootstrap resamples) as null, never a bare NaN token.
        sys.stdout.write(dumps_json({"summary": result.summary_records(), "records": result.records(),
                                     "asymmetry": result.asymmetry, "negative_share": result.negative_share,
                                     "drift_share": result.drift_share,
                                     "l2_center": result.l2_center}, nan_as_null=True, indent=1) + "\n")
        return
    table = Table(
        title=_text(f"top-{k} stability for {query_set} ({result.measure}, K={result.num_columns}, {result.bootstrap} resamples)"),
        caption="K=c: overlap of the top-k of the first c columns with the full list; boot: mean overlap over "
        "resamples; SE/|score|: median bootstrap standard error relative to the score"
        + ("" if result.asymmetry is None else
           f"; asymmetry of W^T U {result.asymmetry:.3f} (0 = the fine-tunes respond linearly; lower is healthier), "
           f"negative-eigenvalue share of its symmetric part {result.negative_share:.2f} (0 for a linear response)")
        + "; drift share " + ("unknown (a column records no loss change from θ0)" if result.drift_share is None else
                              f"{result.drift_share:.3f} (of the loss change, the part common to all columns; lower is healthier)")
        + f"; L2 centre {result.l2_center or 'unknown'}",
    )
    rows = result.summary_records()
    short = {"bootstrap_overlap": "boot", "median_rel_stderr": "SE/|score|"}
    for col in rows[0]:  # overlap@K=16 -> K=16: the top-k overlap with the full list at that K
        label = short.get(col, col.removeprefix("overlap@"))
        table.add_column(label, justify="left" if col in ("query", "side") else "right")
    for r in rows:
        table.add_row(*(_text(v if isinstance(v, str) else f"{v:.3g}") for v in r.values()))
    console.print(table)


@_command(app)
def attribute(
    store: StoreArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The new example's prompt.")] = None,
    completion: Annotated[Optional[str], typer.Option("--completion", help="The output to explain (its loss is what is attributed).")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", help="Many new examples: a data file (.jsonl, .csv, .parquet, ...) with the run's fields and an optional id.")] = None,
    k: KOpt = 10,
    measure: MeasureOpt = TOPK_MEASURE,
    side: SideOpt = "both",
    device: Annotated[str, typer.Option("--device", help="Torch device for the forward passes.")] = "cpu",
    format: FormatOpt = "table",
    output: OutputOpt = None,
    data: DataOpt = [],
    storage_options: StorageOpt = None,
) -> None:
    """Attribute a NEW output: evaluate it under the K kept adapters of a recipe store (K forward passes, no
    gradients) and list the train examples that pushed it up (pos) and down (neg), with their text."""
    _training_extra("daunce attribute")
    if input is not None and (prompt is not None or completion is not None):
        raise InvalidInputError("give --prompt and --completion, or --input FILE, not both")
    rows = read_data_file(input).rows if input is not None else None
    s = _open(store, "r", storage_options)
    train, _ = _example_files(s, data, None)  # a bad file fails before the model loads
    result = s.attribute(rows, prompt=prompt, completion=completion, k=k, measure=measure, side=side, device=device)
    new = rows if rows is not None else [{"prompt": prompt, "completion": completion}]
    asked = DataFile(input or Path("--prompt"), "jsonl", [{c: v for c, v in r.items() if c != "id"} for r in new],
                     list(result.queries), True)
    _emit(result.with_data(train, asked), format, output, "train examples behind the new output")


@_command(app, "self-influence")
def self_influence(
    store: StoreArg,
    k: KOpt = 10,
    side: Annotated[SideChoice, typer.Option(help="pos: highest self-score (mislabels, outliers).")] = "pos",
    measure: Annotated[MeasureName, typer.Option(help="auto, nystrom, whitened or cov (self-score u^T M u; cov: the loss variance).")] = DEFAULT_MEASURE,
    backend: BackendOpt = "auto",
    format: FormatOpt = "table",
    output: OutputOpt = None,
    data: DataOpt = [],
    storage_options: StorageOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Self-influence (each example's own score): mislabel and outlier search."""
    s = _open(store, "r", storage_options)
    train, _ = _example_files(s, data, None)  # a bad file fails before the scan
    result = s.self_influence(k=k, side=side, measure=measure, backend=backend, client=scheduler)
    _emit(result.with_data(train), format, output, "self-influence")


@_command(app)
def serve(
    store: StoreArg,
    data: Annotated[list[str], typer.Option("--data", help="Examples to show: FILE (train) or NAME=FILE (query set NAME); .jsonl/.ndjson, .json, .csv, .tsv, .parquet with an `id` column (else row numbers); repeatable.")] = [],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    cache_gb: Annotated[float, typer.Option("--cache-gb", help="Keep train rows in memory up to this size (GiB); a bigger store is read per request.")] = 4.0,
    batch: Annotated[bool, typer.Option("--batch/--no-batch", help="Score concurrent top-k requests together in one scan (--no-batch: one scan per request).")] = True,
    allowed_host: Annotated[list[str], typer.Option("--allowed-host", help="Also answer requests whose Host is NAME (default: loopback names and the bound address; others are refused against DNS rebinding); repeatable.")] = [],
    token: Annotated[Optional[str], typer.Option("--token", help="Token every request must carry (default: none on loopback, a new one off loopback, printed once in the URL).")] = None,
    no_token: Annotated[bool, typer.Option("--no-token", help="Off loopback, serve without a token (anyone who reaches the port reads the data).")] = False,
    files_root: Annotated[list[str], typer.Option("--files-root", help="Also serve image files under FOLDER (default: only under each data file's folder, symlinks followed); repeatable.")] = [],
    max_work: Annotated[int, typer.Option("--max-work", help="Loss cells one request may score (passes x n x K, bootstrap resamples and queries included); more is refused naming the cap.")] = DEFAULT_MAX_WORK,
    expensive_slots: Annotated[int, typer.Option("--expensive-slots", help="Expensive requests (stability, influence, self-influence, whole-set top-k) run this many at a time, beside named-query top-k.")] = 1,
    expensive_queue: Annotated[int, typer.Option("--expensive-queue", help="Expensive requests that may wait; more are refused with 503 (retry).")] = 16,
    storage_options: StorageOpt = None,
) -> None:
    """Serve attribution over HTTP: a JSON API (top-k, influence, self-influence, stability, status) and a
    page to browse top proponents/opponents with their content; new columns count without a restart."""
    from daunce_store.serve import serve as run_server

    if cache_gb < 0:
        raise InvalidInputError(f"--cache-gb must be >= 0, not {cache_gb}")
    run_server(store, data=data, host=host, port=port, cache_bytes=int(cache_gb * 2**30), batch=batch,
               allowed_hosts=allowed_host, token=token, no_token=no_token, files_roots=files_root, max_work=max_work,
               expensive_slots=expensive_slots, expensive_queue=expensive_queue,
               storage_options=_storage_options(storage_options), log=lambda line: err_console.print(_text(line)))


@_command(app, "check-noise")
def check_noise(
    store: StoreArg,
    config: Annotated[Path, typer.Option("--config", help="The perturb run's YAML (its factory gives θ0 and the training set).")],
    device: Annotated[Optional[str], typer.Option("--device", help="Torch device (overrides the config).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size of the second, shuffled evaluation (default: half the config's eval_batch_size).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    storage_options: StorageOpt = None,
) -> None:
    """Noise floor: θ0's loss under two batchings (and fp32 vs bf16) against each example's spread across K."""
    perturb = _training_extra("daunce check-noise")
    cfg = perturb.PerturbConfig.from_yaml(config)
    reporter = perturb.RichReporter(console=err_console) if progress else None
    try:
        report = perturb.check_noise_from_config(store, cfg, device=device, batch_size=batch_size, base_dir=str(config.parent),
                                                 storage_options=_storage_options(storage_options), reporter=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    _rows_table(f"check-noise on {store}: per train example, K={report.num_columns}; noise from {', '.join(report.sources)}",
                [{k: f"{v:.3g}" if isinstance(v, float) else v for k, v in row.items()} for row in report.rows()])
    console.print(_text((f"warning: {report.message()}", "yellow") if report.noisy else report.message()))


@_command(app)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its store and pictures.")] = Path("daunce-demo"),
    k_perturbations: Annotated[Optional[int], typer.Option("--perturbations", "-K", help="Number of perturbed models (default 64; 16 with --llm).")] = None,
    measure: Annotated[MeasureName, typer.Option(help="Score to rank by (nystrom-corr: the top lists read best; see --help of topk).")] = "nystrom-corr",
    llm: Annotated[bool, typer.Option("--llm", help="Backdoor retrieval on SmolLM2-135M (LoRA perturbations of its last layers on real dialogues) instead of digits.")] = False,
    device: Annotated[str, typer.Option(help="Torch device for --llm (cpu, cuda).")] = "cpu",
    num_dialogues: Annotated[Optional[int], typer.Option(help="Training dialogues for --llm (default 200).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Fine-tuning steps per perturbation for --llm (default 12).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Fine-tuning batch size for --llm (default 8).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="--llm: LoRA on the last this many decoder layers; the layers below run once (default 2).")] = None,
    less: Annotated[bool, typer.Option(help="--llm: also rank by the LESS-style gradient-similarity baseline.")] = True,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 on a GPU, for --llm.")] = "fp32",
) -> None:
    """End-to-end run on real data: perturb, store, score, show top proponents/opponents and a PNG grid."""
    if llm:
        from daunce_store.demo_llm import run_llm_demo

        given = {"num_dialogues": num_dialogues, "steps": steps, "batch_size": batch_size, "layers": layers}
        if k_perturbations is not None:
            given["k_perturbations"] = k_perturbations
        run_llm_demo(workdir, console=console, measure=measure, device=device, precision=precision, less=less,
                     **{name: v for name, v in given.items() if v is not None})
    else:
        from daunce_store.demo import run_demo

        run_demo(workdir, 64 if k_perturbations is None else k_perturbations, console, measure=measure)


eval_app = typer.Typer(help="Accuracy checks on digits: LDS against baselines, backdoor retrieval, mislabel detection, subset removal.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _rows_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=_text(title))
    for col in rows[0]:
        table.add_column(_text(col))
    for r in rows:
        table.add_row(*(_text("" if v is None else f"{v:.3f}" if isinstance(v, float) else v) for v in r.values()))
    console.print(table)


@_command(eval_app, "lds")
def eval_lds(
    ks: Annotated[list[int], typer.Option("-K", help="Daunce K values; repeatable.")] = [8, 16, 32],
    subsets: Annotated[int, typer.Option(help="Retrained 50% subsets (S).")] = 50,
    trak_models: Annotated[int, typer.Option(help="TRAK ensemble size.")] = 5,
    ratio: Annotated[float, typer.Option(help="Daunce subset ratio r.")] = 1.0,
    queries: Annotated[Optional[int], typer.Option(help="Use only the first N test queries.")] = None,
) -> None:
    """LDS of Daunce (every measure) and gradient / influence-function / TRAK baselines on digits."""
    from daunce_store.evaluation import default_config
    from daunce_store.evaluation.lds import compare_methods

    result = compare_methods(ks=ks, num_subsets=subsets, trak_models=trak_models, n_queries=queries,
                             daunce_config=default_config(ratio=ratio), log=console.print)
    _rows_table(f"LDS on digits ({subsets} subsets)", result.rows)


@_command(eval_app, "backdoor")
def eval_backdoor(
    k_perturbations: Annotated[int, typer.Option("--perturbations", "-K")] = 32,
    fraction: Annotated[float, typer.Option(help="Fraction of train images poisoned.")] = 0.03,
    baselines: Annotated[bool, typer.Option(help="Also rank by gradient cosine and the influence function.")] = True,
) -> None:
    """Precision@k of poisoned (triggered, relabeled) examples among triggered queries' top proponents."""
    from daunce_store.evaluation.poison import run_backdoor

    r = run_backdoor(num_perturbations=k_perturbations, fraction=fraction, baselines=baselines)
    console.print(f"{r.num_poisoned} poisoned, attack success {r.attack_success:.0%}, clean accuracy {r.clean_accuracy:.1%}; "
                  f"random ranking expects precision {r.random_precision:.3f}")
    _rows_table(f"backdoor retrieval, {r.num_queries} triggered queries, K={r.num_perturbations}", r.rows())


@_command(eval_app, "removal")
def eval_removal(
    dataset: Annotated[str, typer.Option(help="digits, or chatterbot (topic classification of chatterbot-corpus lines).")] = "digits",
    n: Annotated[list[int], typer.Option("-n", help="How many top proponents to remove; repeatable.")] = [10, 20, 40, 80],
    k_perturbations: Annotated[int, typer.Option("--perturbations", "-K")] = 64,
    groups: Annotated[int, typer.Option(help="Query groups (each a set of correctly classified test examples).")] = 10,
    group_size: Annotated[int, typer.Option(help="Test examples per query group.")] = 5,
    random_seeds: Annotated[int, typer.Option(help="Random removals per N.")] = 5,
    method: Annotated[list[str], typer.Option("--method", help="daunce, grad-cosine, influence-function, trak; repeatable (default: all).")] = [],
) -> None:
    """Subset removal: remove each query group's top-N proponents by Daunce and the baselines, refit, and
    compare the loss change with removing N random examples."""
    from daunce_store.evaluation.removal import REMOVAL_METHODS, subset_removal

    r = subset_removal(dataset, ns=n, num_perturbations=k_perturbations, groups=groups, group_size=group_size,
                       random_seeds=random_seeds, methods=tuple(method) or REMOVAL_METHODS, log=console.print)
    _rows_table(f"subset removal on {dataset}: Δ of the query groups' mean loss / accuracy after removing N",
                [{k: v for k, v in row.items() if k != "per_group"} for row in r.rows])


@_command(eval_app, "mislabel")
def eval_mislabel(
    k_perturbations: Annotated[int, typer.Option("--perturbations", "-K")] = 32,
    fraction: Annotated[float, typer.Option(help="Fraction of train labels flipped.")] = 0.05,
) -> None:
    """Precision/recall of flipped labels in the top-k by self-influence vs by the target model's loss."""
    from daunce_store.evaluation.poison import run_mislabel

    r = run_mislabel(num_perturbations=k_perturbations, fraction=fraction)
    console.print(f"{r.num_flipped} labels flipped; random ranking expects precision {r.random_precision:.3f}")
    _rows_table(f"mislabel detection, K={r.num_perturbations}", r.rows())


if __name__ == "__main__":  # pragma: no cover
    app()
