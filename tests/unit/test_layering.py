"""The layering ARCHITECTURE.md describes, checked on the code: ``proxy/`` speaks typed
registry operations (``upstream/registry.py``) and never HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import mirrorcache

PACKAGE = Path(mirrorcache.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_proxy_never_imports_aiohttp() -> None:
    files = sorted((PACKAGE / "proxy").glob("*.py"))
    assert len(files) >= 6  # the walk really sees the package
    offenders = {f.name: sorted(n for n in _imports(f) if n.split(".")[0] in
                                ("aiohttp", "multidict", "yarl"))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_upstream_and_storage_never_import_proxy_api_or_app() -> None:
    for layer in ("upstream", "storage"):
        for f in sorted((PACKAGE / layer).glob("*.py")):
            bad = [n for n in _imports(f) if n.startswith(("mirrorcache.proxy",
                                                           "mirrorcache.api",
                                                           "mirrorcache.app"))]
            assert bad == [], f"{layer}/{f.name} imports {bad}"
