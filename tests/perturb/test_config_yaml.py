"""YAML configs: aliases may not expand past MAX_YAML_ALIAS_NODES. A "billion laughs" ``factory_kwargs`` made
`daunce perturb` grow to 1.5 GB and never finish; now it is refused at once, naming the file."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")  # daunce_store.perturb needs the train extra

from typer.testing import CliRunner  # noqa: E402

import daunce_store  # noqa: E402
from daunce_store.cli import app  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.perturb import PerturbConfig  # noqa: E402
from daunce_store.perturb._config import MAX_YAML_ALIAS_NODES, read_yaml  # noqa: E402

runner = CliRunner()


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """The classic document: each level lists the one below ``width`` times, so ``width**levels`` leaves."""
    lines = ["num_perturbations: 2", "factory: 'pkg.mod:build'", "factory_kwargs:",
             f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A regression would hang (and eat memory), not fail: SIGALRM turns that into a failure after 60 s."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("reading the YAML config did not finish in 60 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_billion_laughs_is_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    start = time.perf_counter()
    with pytest.raises(InvalidInputError) as info:
        PerturbConfig.from_yaml(path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert str(path) in message and "YAML aliases" in message and f"limit of {MAX_YAML_ALIAS_NODES:,}" in message
    # Level i expanded holds 1 + 10 * (level i-1) nodes, level 0 eleven; the file itself holds 11 + 8 of them.
    sizes = [11]
    for _ in range(8):
        sizes.append(1 + 10 * sizes[-1])
    assert f"expand to {sum(sizes) - 19:,} more nodes" in message  # 1,234,567,880


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").write_text("factory_kwargs: &a {x: [*a]}\n")
    with pytest.raises(InvalidInputError, match="loop.yaml.*recursive structure"):
        PerturbConfig.from_yaml(tmp_path / "loop.yaml")


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("factory_kwargs: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(InvalidInputError, match="deep.yaml.*nests its YAML too deeply"):
        PerturbConfig.from_yaml(tmp_path / "deep.yaml")


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("factory: 'pkg.mod:build'\nfactory_kwargs:\n  base: &b {width: 8, depth: 2}\n"
                    "  a: *b\n  c: {<<: *b, depth: 3}\nlora: &l {r: 8}\n")
    cfg = PerturbConfig.from_yaml(path)
    assert cfg.factory_kwargs == {"base": {"width": 8, "depth": 2}, "a": {"width": 8, "depth": 2},
                                  "c": {"width": 8, "depth": 3}}
    assert cfg.lora_settings()["r"] == 8


def test_the_bound_counts_expansion_not_file_size(tmp_path: Path) -> None:
    """A big file written out is fine (its size is its own cost); aliases adding more than the bound are not."""
    big = tmp_path / "big.yaml"
    big.write_text("factory_kwargs: {sizes: [" + ", ".join(["1"] * (3 * MAX_YAML_ALIAS_NODES)) + "]}\n")
    assert len(read_yaml(big)["factory_kwargs"]["sizes"]) == 3 * MAX_YAML_ALIAS_NODES
    block = "[" + ", ".join(["1"] * 99) + "]"  # 100 nodes; 101 aliases of it add 10,100 > 10,000
    over = tmp_path / "over.yaml"
    over.write_text(f"factory_kwargs: {{b: &b {block}, u: [{', '.join(['*b'] * 101)}]}}\n")
    with pytest.raises(InvalidInputError, match="10,100 more nodes"):
        read_yaml(over)
    over.write_text(f"factory_kwargs: {{b: &b {block}, u: [{', '.join(['*b'] * 100)}]}}\n")
    assert len(read_yaml(over)["factory_kwargs"]["u"]) == 100  # 10,000: at the bound


def test_daunce_perturb_refuses_a_billion_laughs_config(tmp_path: Path) -> None:
    (tmp_path / "laughs.yaml").write_text(billion_laughs())
    result = runner.invoke(app, ["perturb", str(tmp_path / "s.zarr"), "--config", str(tmp_path / "laughs.yaml")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "laughs.yaml" in text and "YAML aliases" in text and "Traceback" not in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_daunce_add_queries_refuses_a_billion_laughs_config(tmp_path: Path) -> None:
    daunce_store.init(tmp_path / "s.zarr", ["a", "b", "c"])
    (tmp_path / "q.txt").write_text("q0\n")
    (tmp_path / "laughs.yaml").write_text(billion_laughs())
    result = runner.invoke(app, ["add-queries", str(tmp_path / "s.zarr"), "--query-set", f"more={tmp_path / 'q.txt'}",
                                 "--config", str(tmp_path / "laughs.yaml")])
    assert result.exit_code == 2, result.output
    assert "YAML aliases" in " ".join(result.output.split())
    assert daunce_store.open(tmp_path / "s.zarr", mode="r").query_sets() == {}  # refused before the first write
