"""The package's import graph: no cycle (deferred imports count), and the beat side never imports the worker
side (the beat runs no job code; a beat's process need not load Celery's worker)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "celery_dbsched"
BEAT_SIDE = {"scheduler", "publisher", "beat_schedule", "wakeup"}
WORKER_SIDE = {"worker", "runner"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside a function (`__init__`, which
    re-exports, and the migrations are left out)."""
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for module in modules:
        imported: set[str] = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import y
                    imported.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    imported.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("celery_dbsched."):
                    imported.add(node.module.split(".")[1])
                elif node.module == "celery_dbsched":
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(
                    alias.name.split(".")[1] for alias in node.names if alias.name.startswith("celery_dbsched.")
                )
        graph[module] = imported & modules
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component: list[str] = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph[module]:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert {"scheduler", "worker", "protocol", "registry"} <= set(graph)
    assert "protocol" in graph["worker"] and "protocol" in graph["scheduler"]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_beat_side_never_imports_the_worker_side() -> None:
    graph = import_graph()
    for module in sorted(BEAT_SIDE):
        assert not (reachable(graph, module) & WORKER_SIDE), module
