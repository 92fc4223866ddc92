"""The import graph of mirrorcache: no cycles, and the low layers import nothing above them.

Function-local imports count too: a cycle hidden inside a function is still a cycle.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mirrorcache"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.names: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            return  # type-only imports are not runtime dependencies
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names += [a.name for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.names += [f"{node.module}.{a.name}" for a in node.names]


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text()))
        targets = {resolve(n) for n in visitor.names if n.startswith("mirrorcache")}
        graph[module] = targets - {module, ""}
    return graph


def test_no_import_cycles() -> None:
    try:
        graphlib.TopologicalSorter(_import_graph()).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' imports '.join(reversed(exc.args[1]))}")


@pytest.mark.parametrize(("module", "allowed"), [
    ("mirrorcache.yamlfile", set()),
    ("mirrorcache.errors", set()),
    ("mirrorcache.policy", {"mirrorcache.yamlfile"}),
])
def test_low_layers_import_nothing_above(module: str, allowed: set[str]) -> None:
    assert _import_graph()[module] <= allowed


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_proxy_never_imports_aiohttp() -> None:
    """``proxy/`` speaks typed registry operations (``upstream/registry.py``), never HTTP."""
    files = sorted((ROOT / "proxy").glob("*.py"))
    assert len(files) >= 6  # the walk really sees the package
    offenders = {f.name: sorted(n for n in _imports(f) if n.split(".")[0] in
                                ("aiohttp", "multidict", "yarl"))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_upstream_and_storage_never_import_proxy_api_or_app() -> None:
    for layer in ("upstream", "storage"):
        for f in sorted((ROOT / layer).glob("*.py")):
            bad = [n for n in _imports(f) if n.startswith(("mirrorcache.proxy",
                                                           "mirrorcache.api",
                                                           "mirrorcache.app"))]
            assert bad == [], f"{layer}/{f.name} imports {bad}"
