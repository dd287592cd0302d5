"""Everyday mistakes through the real ``daunce`` entry point and the public API: each one is a one-line
``DaunceStoreError`` that says what is wrong (CLI: one red line, exit code 2, no traceback), and the store
is left exactly as it was.

The cases are a table: a command line (or an API call) built from garbage files written on disk, and a
piece of the message the user must see.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.lib import format as npy
from typer.testing import CliRunner

import daunce_store
from daunce_store import errors
from daunce_store.cli import app
from daunce_store.store import read_ids, read_losses

runner = CliRunner()
N, M = 20, 2


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (path and content hash) and every folder: what "unchanged" means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def _garbage(d: Path) -> None:
    """The bad inputs, written once per test: each file is one kind of everyday mistake."""
    np.save(d / "good.npy", np.random.default_rng(0).random(N))
    np.save(d / "good_q.npy", np.random.default_rng(1).random(M))
    np.save(d / "objects.npy", np.array([{"loss": 1.0}] * N, dtype=object), allow_pickle=True)
    (d / "text.npy").write_text("0.1\n0.2\n")  # a text file renamed .npy
    good = (d / "good.npy").read_bytes()
    (d / "truncated.npy").write_bytes(good[:-40])
    (d / "truncated_header.npy").write_bytes(good[:20])
    (d / "empty.npy").write_bytes(b"")
    header = io.BytesIO()  # a header that claims 10**10 float32 (37 GiB) over 64 bytes of data
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    (d / "huge_header.npy").write_bytes(header.getvalue() + b"\0" * 64)
    np.save(d / "strings.npy", np.array(["a"] * N))
    np.save(d / "matrix.npy", np.ones((N, 3)))
    (d / "words.csv").write_text("loss\n" + "\n".join(["0.5"] * 3 + ["oops"] + ["0.5"] * (N - 4)) + "\n")
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("loss\n")
    (d / "binary.csv").write_bytes(bytes(range(128, 256)) * 2)
    pd.DataFrame({"loss": ["x"] * N}).to_parquet(d / "words.parquet")
    (d / "garbage.parquet").write_bytes(b"not parquet at all")
    (d / "a_folder").mkdir()
    # ids
    (d / "ids_empty.csv").write_text("")
    (d / "ids_header_only.csv").write_text("id\n")
    (d / "ids_binary.txt").write_bytes(bytes(range(128, 256)))
    (d / "ids_nul.txt").write_bytes(b"a\x00b\nc\n")
    (d / "ids_empty.txt").write_text("")
    (d / "new_ids.txt").write_text("n0\nn1\n")
    # configs
    for name, text in {
        "cfg_epochs.yaml": "epochs: ten\n",
        "cfg_lr.yaml": "lr: [1]\n",
        "cfg_lora.yaml": "lora: 5\n",
        "cfg_lora_r.yaml": "lora: {r: many}\n",
        "cfg_bool.yaml": "keep_adapters: maybe\n",
        "cfg_null.yaml": "batch_size: null\n",
        "cfg_unknown.yaml": "learning_rate: 0.1\n",
        "cfg_syntax.yaml": "epochs: [1\n",
        "cfg_list.yaml": "- epochs\n- 3\n",
    }.items():
        (d / name).write_text(text)
    (d / "cfg_binary.yaml").write_bytes(bytes(range(128, 256)))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    _garbage(tmp_path)
    path = tmp_path / "s.zarr"
    s = daunce_store.init(path, [f"t{i}" for i in range(N)], {"test": [f"q{j}" for j in range(M)]}, chunk_rows=8)
    rng = np.random.default_rng(2)
    for k in range(3):
        s.append(f"p{k}", rng.random(N), {"test": rng.random(M)})
    return path


def _refused(store: Path, args: list[str], match: str) -> None:
    before = _digest(store)
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert match in text, result.output
    assert "Traceback" not in result.output and text.startswith("error:"), result.output
    assert _digest(store) == before


# (case id, command line with {s} = the store and {d} = the folder of garbage files, message fragment)
CLI_CASES: list[tuple[str, str, str]] = [
    # 1. malformed loss files
    ("npy-objects", "append {s} --perturbation px --train {d}/objects.npy", "holds Python objects"),
    ("npy-text", "append {s} --perturbation px --train {d}/text.npy", "is not a .npy file"),
    ("npy-truncated", "append {s} --perturbation px --train {d}/truncated.npy", "is truncated"),
    ("npy-truncated-header", "append {s} --perturbation px --train {d}/truncated_header.npy", ".npy header is damaged"),
    ("npy-empty", "append {s} --perturbation px --train {d}/empty.npy", "is empty (0 bytes)"),
    ("npy-huge-header", "append {s} --perturbation px --train {d}/huge_header.npy", f"expected {N} losses"),
    ("npy-strings", "append {s} --perturbation px --train {d}/strings.npy", "not numbers"),
    ("npy-matrix", "append {s} --perturbation px --train {d}/matrix.npy", "shape (20, 3)"),
    ("npy-query-objects", "append {s} --perturbation px --train {d}/good.npy --query test={d}/objects.npy", "holds Python objects"),
    ("npy-query-huge", "append {s} --perturbation px --train {d}/good.npy --query test={d}/huge_header.npy", f"expected {M} losses"),
    ("npy-query-empty", "append {s} --perturbation px --train {d}/good.npy --query test={d}/empty.npy", "is empty"),
    ("csv-words", "append {s} --perturbation px --train {d}/words.csv", "row 3 holds 'oops', not a number"),
    ("csv-empty", "append {s} --perturbation px --train {d}/empty.csv", "is empty"),
    ("csv-header-only", "append {s} --perturbation px --train {d}/header_only.csv", "has a header but no rows"),
    ("csv-binary", "append {s} --perturbation px --train {d}/binary.csv", "is not UTF-8 text"),
    ("parquet-words", "append {s} --perturbation px --train {d}/words.parquet", "not a number"),
    ("parquet-garbage", "append {s} --perturbation px --train {d}/garbage.parquet", "is not a readable parquet file"),
    ("loss-folder", "append {s} --perturbation px --train {d}/a_folder", "is a directory"),
    ("loss-missing", "append {s} --perturbation px --train {d}/nope.npy", "does not exist"),
    # 2. id files
    ("ids-empty-csv", "add-queries {s} --query-set extra={d}/ids_empty.csv", "is empty"),
    ("ids-header-only", "add-queries {s} --query-set extra={d}/ids_header_only.csv", "has a header but no rows"),
    ("ids-folder", "add-queries {s} --query-set extra={d}/a_folder", "is a directory"),
    ("ids-binary", "add-queries {s} --query-set extra={d}/ids_binary.txt", "is not UTF-8 text"),
    ("ids-nul", "add-queries {s} --query-set extra={d}/ids_nul.txt", "NUL bytes"),
    ("ids-empty-txt", "add-queries {s} --query-set extra={d}/ids_empty.txt", "is empty"),
    ("ids-garbage-parquet", "add-queries {s} --query-set extra={d}/garbage.parquet", "is not a readable parquet file"),
    ("init-ids-folder", "init {d}/new.zarr --train-ids {d}/a_folder", "is a directory"),
    # 4. perturbation configs (refused before anything touches the store)
    ("config-type", "perturb {s} --config {d}/cfg_epochs.yaml", "epochs must be a whole number, not str 'ten'"),
    ("config-list", "perturb {s} --config {d}/cfg_list.yaml", "must be a mapping, not list"),
    ("config-folder", "perturb {s} --config {d}/a_folder", "is a directory"),
    ("add-queries-config", "add-queries {s} --query-set extra={d}/new_ids.txt --config {d}/cfg_lr.yaml", "lr must be a finite number"),
    # 5. store locations
    ("url-unknown-scheme", "status foo://bucket/x", "unsupported scheme 'foo'"),
    ("url-http", "topk http://example.invalid/s.zarr --query-set test", "unsupported scheme 'http'"),
    ("url-bad-s3", "status s3:/", "store URL 's3:/'"),
    ("store-empty-string", "status ''", "is empty"),
    # 6. everything else
    ("store-is-file", "topk {d}/good.npy --query-set test", "is a file, not a daunce store"),
    ("store-empty-dir", "status {d}/a_folder", "nothing there"),
    ("store-missing", "append {d}/nope.zarr --perturbation px --train {d}/good.npy", "nothing there"),
    ("k-zero", "topk {s} --query-set test -k 0", "k must be a whole number >= 1"),
    ("k-negative", "self-influence {s} -k -1", "k must be a whole number >= 1"),
    ("k-huge", "influence {s} --query-set test -k 99999999999999999999", "larger than the training set"),
    ("unknown-set", "scores {s} --query-set nope -o {d}/o.csv", "unknown query set 'nope'"),
    ("unknown-query", "stability {s} --query-set test --query q9", "'q9' is not in the query set"),
    ("parquet-no-output", "topk {s} --query-set test --format parquet", "give an output file"),
    ("output-folder", "export {s} -o {d}/a_folder", "cannot export to"),
    ("output-bad-suffix", "scores {s} --query-set test -o {d}/o.weird", "unknown output format"),
    ("bad-fraction", "stability {s} --query-set test --fraction 2", "fractions must be in (0, 1]"),
    ("demo-k-zero", "demo -K 0 --workdir {d}/demo", "--perturbations must be >= 4"),
    ("stability-seed", "stability {s} --query-set test --seed -1", "seed must be a whole number >= 0"),
    ("stability-bootstrap-huge", "stability {s} --query-set test --bootstrap 100000000000", "bootstrap must be a whole number in 0..10000"),
    ("lds-k-zero", "eval lds -K 0", "every K must be a whole number >= 2"),
    ("output-into-store", "topk {s} --query-set test -o {s}/zarr.json --format json", "inside the Zarr store"),
    ("output-under-a-file", "topk {s} --query-set test -o {d}/good.npy/x.csv", "is a file"),
    ("output-missing-folder", "topk {s} --query-set test -o {d}/missing/x.csv", "does not exist"),
]


@pytest.mark.parametrize(("command", "match"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_garbage(store: Path, command: str, match: str) -> None:
    import shlex

    args = [a.format(s=store, d=store.parent) for a in shlex.split(command)]
    _refused(store, args, match)


def test_npy_header_is_checked_before_reading(store: Path) -> None:
    """A header claiming 10**10 elements is refused from the header alone, with or without n."""
    huge = store.parent / "huge_header.npy"
    with pytest.raises(errors.InvalidInputError, match=f"expected {N} losses"):
        read_losses(huge, N)
    with pytest.raises(errors.InvalidInputError, match="is truncated"):
        read_losses(huge)


def test_ids_keep_leading_zeros_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("007\n010\nNA\n")
    (tmp_path / "ids.csv").write_text("id\n007\n010\nNA\n")
    pd.DataFrame({"id": ["007", "010", "NA"]}).to_parquet(tmp_path / "ids.parquet")
    pd.DataFrame({"id": [7, 10]}).to_parquet(tmp_path / "int_ids.parquet")
    for name in ("ids.txt", "ids.csv", "ids.parquet"):
        assert read_ids(tmp_path / name).tolist() == ["007", "010", "NA"], name
    assert read_ids(tmp_path / "int_ids.parquet").tolist() == ["7", "10"]
    # and through the CLI: a CSV of ids makes the same store as the text file
    for name in ("ids.txt", "ids.csv"):
        result = runner.invoke(app, ["init", str(tmp_path / f"{name}.zarr"), "--train-ids", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert daunce_store.open(tmp_path / f"{name}.zarr", mode="r").train_ids.tolist() == ["007", "010", "NA"]


@pytest.mark.parametrize(
    ("file", "match"),
    [
        ("cfg_epochs.yaml", "epochs must be a whole number, not str 'ten'"),
        ("cfg_lr.yaml", "lr must be a finite number, not list [1]"),
        ("cfg_lora.yaml", "lora must be a mapping or null, not int 5"),
        ("cfg_lora_r.yaml", "lora.r must be a whole number"),
        ("cfg_bool.yaml", "keep_adapters must be true or false"),
        ("cfg_null.yaml", "batch_size must be a whole number, not NoneType"),
        ("cfg_unknown.yaml", "unknown keys ['learning_rate']"),
        ("cfg_syntax.yaml", "is not valid YAML"),
        ("cfg_list.yaml", "must be a mapping, not list"),
        ("cfg_binary.yaml", "is not UTF-8 text"),
        ("missing.yaml", "does not exist"),
        ("a_folder", "is a directory"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, file: str, match: str) -> None:
    from daunce_store.perturb._config import PerturbConfig

    _garbage(tmp_path)
    with pytest.raises(errors.InvalidInputError) as info:
        PerturbConfig.from_yaml(tmp_path / file)
    assert match in str(info.value)


def test_config_reads_yaml_exponents_as_numbers(tmp_path: Path) -> None:
    """PyYAML reads `lr: 3e-4` (no dot) as a string; it is the number meant, not a type error."""
    from daunce_store.perturb._config import PerturbConfig

    (tmp_path / "run.yaml").write_text("lr: 3e-4\nweight_decay: 1e-3\n")
    cfg = PerturbConfig.from_yaml(tmp_path / "run.yaml")
    assert cfg.lr == 3e-4 and cfg.weight_decay == 1e-3


@pytest.mark.parametrize(
    ("damaged", "content"),
    [
        ("zarr.json", b'{"zarr_format": 3, "node_ty'),
        ("zarr.json", b"[]"),
        ("train/zarr.json", b'{"zarr'),
        ("train/losses/zarr.json", b"\xff\xfe garbage"),
        ("queries/zarr.json", b"nope"),
        ("queries/test/zarr.json", b'{"zarr'),
        ("queries/test/ids/zarr.json", b""),
        ("queries/test/losses/zarr.json", b"{"),
    ],
)
def test_damaged_zarr_metadata_is_named_at_open(store: Path, damaged: str, content: bytes) -> None:
    (store / damaged).write_bytes(content)
    for args in (["status", str(store)], ["topk", str(store), "--query-set", "test"], ["compact", str(store)]):
        _refused(store, args, f"its Zarr metadata file {damaged!r} is damaged")
    with pytest.raises(errors.NotADaunceStoreError, match="restore"):
        daunce_store.open(store, mode="r")


def _read_only_cases(store: Path) -> list[list[str]]:
    d = store.parent
    return [
        ["append", str(store), "--perturbation", "px", "--train", str(d / "good.npy")],
        ["add-queries", str(store), "--query-set", f"extra={d / 'new_ids.txt'}"],
        ["compact", str(store)],
    ]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_store(store: Path) -> None:
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    try:
        for args in _read_only_cases(store):
            _refused(store, args, "is read-only for this user")
        assert daunce_store.open(store, mode="r").num_columns() == 3  # reading still works
        result = runner.invoke(app, ["status", str(store)])
        assert result.exit_code == 0, result.output
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_read_only_store_simulated(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal where the tests run as root (which ignores permissions): the check is os.access."""
    real_access = os.access
    log = (store / "_daunce").resolve()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == log and mode & os.W_OK else real_access(p, mode, **kw))
    for args in _read_only_cases(store):
        _refused(store, args, "_daunce is not writable")
    assert daunce_store.open(store, mode="r").num_columns() == 3


def test_write_refused_by_the_file_system_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put the OS refuses (permissions, a read-only mount) past the open-time check, as obstore reports it."""
    import obstore

    from daunce_store.store import Storage

    storage = Storage(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise obstore.exceptions.GenericError("Generic LocalFileSystem error: Unable to open file x: Permission denied (os error 13)")

    monkeypatch.setattr(obstore, "put", refuse)
    for call in (lambda: storage.put_if_absent("_daunce/a.json", {}), lambda: storage.put("_daunce/a.json", {}), lambda: storage.put_bytes("a", b"")):
        with pytest.raises(errors.InvalidInputError, match="permission denied"):
            call()


# --- the public API -------------------------------------------------------------------------------
def _open(store: Path, mode: str = "r") -> daunce_store.Store:
    return daunce_store.open(store, mode=mode)  # type: ignore[arg-type]


API_CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("open-int", lambda s: daunce_store.open(123), "a path or a URL string"),  # type: ignore[arg-type]
    ("open-none", lambda s: daunce_store.open(None), "a path or a URL string"),  # type: ignore[arg-type]
    ("open-options-str", lambda s: daunce_store.open(s, storage_options="x"), "storage_options must be a dict"),  # type: ignore[arg-type]
    ("open-scheme", lambda s: daunce_store.open("foo://bucket/x"), "unsupported scheme"),
    ("read-losses-none", lambda s: read_losses(None), "must be a path"),  # type: ignore[arg-type]
    ("read-ids-int", lambda s: read_ids(5), "must be a path"),  # type: ignore[arg-type]
    ("topk-k-str", lambda s: _open(s).topk("test", k="a"), "k must be a whole number"),  # type: ignore[arg-type]
    ("topk-k-bool", lambda s: _open(s).topk("test", k=True), "k must be a whole number"),
    ("topk-queries-str", lambda s: _open(s).topk("test", "q0"), "queries must be a list of query ids"),
    ("topk-queries-int", lambda s: _open(s).topk("test", 5), "queries must be a list of query ids"),  # type: ignore[arg-type]
    ("topk-set-list", lambda s: _open(s).topk(["test"]), "query_set must be a query-set name"),  # type: ignore[arg-type]
    ("topk-columns-str", lambda s: _open(s).topk("test", columns="ab"), "columns must be a list of integer"),
    ("topk-columns-int", lambda s: _open(s).topk("test", columns=5), "columns must be a list of integer"),  # type: ignore[arg-type]
    ("topk-columns-float", lambda s: _open(s).topk("test", columns=[0.5, 1]), "columns must be a list of integer"),  # type: ignore[list-item]
    ("topk-block-rows", lambda s: _open(s).topk("test", block_rows=-1), "block_rows must be a whole number >= 1"),
    ("topk-snapshot", lambda s: _open(s).topk("test", snapshot="x"), "snapshot must be a Snapshot"),  # type: ignore[arg-type]
    ("scores-block-rows", lambda s: _open(s).scores("test", block_rows="a"), "block_rows must be"),  # type: ignore[arg-type]
    ("self-influence-k", lambda s: _open(s).self_influence(k=1.5), "k must be a whole number"),  # type: ignore[arg-type]
    ("influence-unknown", lambda s: _open(s).influence("nope"), "unknown query set 'nope'"),
    ("append-read-only-mode", lambda s: _open(s).append("px", np.ones(N)), "read-only"),
    ("add-query-set-none", lambda s: _open(s, "a").add_query_set("extra", None), "non-empty 1-d list of ids"),  # type: ignore[arg-type]
    ("stability-seed-str", lambda s: _open(s).stability("test", seed="a"), "seed must be a whole number"),  # type: ignore[arg-type]
    ("stability-fractions-str", lambda s: _open(s).stability("test", fractions="a"), "fractions must be a list of numbers"),  # type: ignore[arg-type]
    ("stability-fractions-float", lambda s: _open(s).stability("test", fractions=0.5), "fractions must be a list of numbers"),  # type: ignore[arg-type]
    ("init-capacity-str", lambda s: daunce_store.init(s.parent / "new.zarr", ["a"], capacity="a"), "capacity must be a whole number"),  # type: ignore[arg-type]
    ("init-seed-str", lambda s: daunce_store.init(s.parent / "new.zarr", ["a"], seed="a"), "seed must be a whole number"),  # type: ignore[arg-type]
    ("init-attributes-int", lambda s: daunce_store.init(s.parent / "new.zarr", ["a"], attributes=5), "attributes must be a mapping"),  # type: ignore[arg-type]
    ("init-query-sets-list", lambda s: daunce_store.init(s.parent / "new.zarr", ["a"], ["q"]), "query_sets must map a name"),  # type: ignore[arg-type]
    ("append-query-losses-list", lambda s: _open(s, "a").append("px", np.ones(N), [np.ones(3)]), "query_losses must map"),  # type: ignore[arg-type]
    ("export-none", lambda s: _open(s).export(None), "export needs a file path"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_garbage(store: Path, call: Callable[[Path], object], match: str) -> None:
    before = _digest(store)
    with pytest.raises(errors.DaunceStoreError) as info:
        call(store)
    assert match in str(info.value)
    assert _digest(store) == before


def test_api_metadata_that_is_not_json(store: Path) -> None:
    """Refused before anything is written: no commit record, and no slot claimed either."""
    s = _open(store, "a")
    before = _digest(store)
    for bad in ({"a": object()}, "x", [1]):
        with pytest.raises(errors.InvalidInputError, match="metadata must"):
            s.append("px", np.ones(N), metadata=bad)  # type: ignore[arg-type]
    assert not s.is_committed("px") and s.num_columns() == 3 and _digest(store) == before


def test_entry_point_prints_one_line_for_an_empty_npy(store: Path) -> None:
    """The installed entry point, in a fresh process: a 0-byte .npy used to print only `Aborted.`
    (numpy's EOFError, which click takes for Ctrl-D)."""
    before = _digest(store)
    proc = subprocess.run(
        [sys.executable, "-m", "daunce_store.cli", "append", str(store), "--perturbation", "px", "--train", str(store.parent / "empty.npy")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr + proc.stdout
    assert "is empty (0 bytes)" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _digest(store) == before


def test_damaged_copy_does_not_touch_the_original(store: Path, tmp_path: Path) -> None:
    """A damaged copy is named by its own path (the message is about the store given, not another)."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    (copy / "train" / "zarr.json").write_bytes(b"{")
    _refused(copy, ["status", str(copy)], f"{copy} is not a daunce store this package can read")
