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


def _imported(path: Path, root: Path = PACKAGE) -> list[tuple[int, str, list[str]]]:
    """Every import in ``path`` (a module of the package at ``root``), as (line, absolute module, the names a
    ``from`` import takes from it); relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root).with_suffix("").parts
    here = ".".join((root.name, *parts[:-1]) if parts[-1] == "__init__" else (root.name, *parts))
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = here.split(".") if parts[-1] == "__init__" else here.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name, [a.name for a in node.names]))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for line, name, names in _imported(path):
        if name == "daunce_store" and names:  # `from daunce_store import scoring`: the submodules it names
            out += [(line, f"daunce_store.{a}") for a in names]
        else:
            out.append((line, name))
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


def _circles(folder: Path, root: Path = PACKAGE) -> list[list[str]]:
    """The import circles among the modules of one package (the .py files in ``folder``, its ``__init__``
    included): every import counts, at module level, inside a function or under TYPE_CHECKING. Each
    circle is listed once, as the modules in it, sorted."""
    package = ".".join((root.name, *folder.relative_to(root).parts))
    modules = {p.stem for p in folder.glob("*.py")}

    def node(name: str, names: list[str]) -> list[str]:
        if name == package:  # `from . import x`: module x, else the package's __init__
            return [n for n in names if n in modules] or ["__init__"]
        rest = name.removeprefix(package + ".").split(".")[0] if name.startswith(package + ".") else None
        return [rest] if rest in modules else []

    edges = {m: {t for _, name, names in _imported(folder / f"{m}.py", root) for t in node(name, names)} - {m} for m in modules}
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for t in sorted(edges[m]):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            component = []
            while True:
                t = stack.pop()
                component.append(t)
                if t == m:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return sorted(out)


PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("folder", PACKAGES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_import_circles_inside_a_package(folder: Path):
    """Inside one package the modules import one way too: a circle means a shared piece belongs a layer
    lower (a function-level import only hides it)."""
    circles = _circles(folder)
    assert not circles, f"import circles in {folder.relative_to(PACKAGE.parent)}: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_fires(tmp_path):
    """On a small package with a circle (a -> b at module level, b -> a inside a function and relative),
    and one without, the check names exactly the circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import x\n")
    (pkg / "a.py").write_text("from pkg.b import y\nx = y\n")
    (pkg / "b.py").write_text("y = 1\n\ndef f():\n    from . import a\n    return a.x\n")
    (pkg / "c.py").write_text("import pkg.b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from pkg.sub import e\n")
    (pkg / "sub" / "e.py").write_text("from pkg import c\nfrom .. import a\n")
    assert _circles(pkg, pkg) == [["a", "b"]]
    assert _circles(pkg / "sub", pkg) == []
    (pkg / "sub" / "e.py").write_text("from pkg.sub.d import z\n")
    assert _circles(pkg / "sub", pkg) == [["d", "e"]]
    (pkg / "b.py").write_text("import pkg\n")  # the package's own __init__, which imports a
    assert _circles(pkg, pkg) == [["__init__", "a", "b"]]


def test_format_doc_lists_every_key():
    """FORMAT.md is the one map of the on-disk format: every name in _constants appears there."""
    from daunce_store import _constants as C

    doc = (PACKAGE.parent / "FORMAT.md").read_text()
    names = {k: v for k, v in vars(C).items() if k.endswith(("_PREFIX", "_GROUP", "_ARRAY", "_ATTR"))}
    missing = [f"{k} = {v!r}" for k, v in names.items() if k not in doc or str(v) not in doc]
    assert not missing, f"FORMAT.md does not document: {missing}"
