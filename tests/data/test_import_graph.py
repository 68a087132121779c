"""The data package's modules import one another without a cycle (lazy imports
inside functions count: a cycle there is one edit away from an import-time failure)."""

from __future__ import annotations

import ast
from pathlib import Path

import fltool.data

PACKAGE = Path(fltool.data.__file__).parent


def imported_siblings(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fltool.data."):
            names.add(node.module.removeprefix("fltool.data.").split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("fltool.data.").split(".")[0] for a in node.names if a.name.startswith("fltool.data."))
    return names


def test_data_modules_import_without_a_cycle():
    graph = {p.stem: imported_siblings(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "types" in graph["user"] and "datasets" not in graph["user"]
