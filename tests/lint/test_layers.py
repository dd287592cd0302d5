"""Imports run one way (README, "Code map"): errors/_constants/_ext ← store ← scoring ← the façade ←
evaluation/demos ← cli, and perturb uses the store but never scoring. Every import in the package,
at module level or inside a function, is checked against that order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "daunce_store"

# Lower number = lower layer. A module may import only from its own layer or lower ones.
LAYERS = {
    "errors": 0, "_constants": 0, "_ext": 0, "_optional": 0, "_kernel": 0,
    "store": 1,
    "perturb": 2,  # beside scoring: uses the store, never scoring
    "scoring": 2,
    "_api": 3, "__init__": 3, "_select": 3,
    "evaluation": 4, "demo": 4, "demo_llm": 4,
    "serve": 4,  # beside evaluation: the façade over HTTP
    "cli": 5,
}
FORBIDDEN = {("perturb", "scoring"), ("scoring", "perturb")}


def _unit(module: str) -> str:
    """daunce_store.store._read -> store; daunce_store -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    here = "daunce_store." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "daunce_store":  # `from daunce_store import scoring`: the submodules it names
                out += [(node.lineno, f"daunce_store.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return [(line, name) for line, name in out if name == "daunce_store" or name.startswith("daunce_store.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path):
    rel = path.relative_to(PACKAGE)
    unit = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"
    assert unit in LAYERS, f"{rel}: unknown unit {unit!r}; give it a layer in this test"
    bad = []
    for line, name in _imports(path):
        target = _unit(name)  # `import daunce_store` is the façade (__init__)
        if target == unit:
            continue
        if LAYERS.get(target, 99) > LAYERS[unit] or (unit, target) in FORBIDDEN:
            bad.append(f"{rel}:{line} imports {name} ({target}, layer {LAYERS.get(target)}) from layer {LAYERS[unit]} ({unit})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_catches_a_violation(tmp_path):
    """The check can fail: a store module importing scoring is reported."""
    bad = PACKAGE / "store" / "_layer_probe_tmp.py"
    bad.write_text("from daunce_store.scoring import topk\n")
    try:
        with pytest.raises(AssertionError, match="imports daunce_store.scoring"):
            test_imports_run_one_way(bad)
    finally:
        bad.unlink()


def test_format_doc_lists_every_key():
    """FORMAT.md is the one map of the on-disk format: every name in _constants appears there."""
    from daunce_store import _constants as C

    doc = (PACKAGE.parent / "FORMAT.md").read_text()
    names = {k: v for k, v in vars(C).items() if k.endswith(("_PREFIX", "_GROUP", "_ARRAY", "_ATTR"))}
    missing = [f"{k} = {v!r}" for k, v in names.items() if k not in doc or str(v) not in doc]
    assert not missing, f"FORMAT.md does not document: {missing}"
