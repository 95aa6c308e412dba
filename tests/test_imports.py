"""The package's import graph, read from the source with `ast`: no module needs itself back (no
cycle), whether it imports at the top or inside a function, and no module reaches into another's
private names. An import under `if TYPE_CHECKING:` never runs: it is left out of the run-time graph,
and the graph with it may have no cycle either (a type-only cycle is a design loop all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_sdpo"
MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, type_checking: bool = False):
    """(module imported, names) of every import of the package's own modules; TYPE_CHECKING blocks only if asked."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child) and not type_checking:
                continue
            todo.append(child)
            if isinstance(child, ast.ImportFrom):
                names = [a.name for a in child.names]
                if child.level == 1 and child.module:
                    yield child.module.split(".")[0], names
                elif child.level == 1:  # from . import x, y
                    yield from ((n, []) for n in names)
                elif child.module and child.module.split(".")[0] == "lora_sdpo":
                    parts = child.module.split(".")
                    yield from ([(parts[1], names)] if len(parts) > 1 else ((n, []) for n in names))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    parts = a.name.split(".")
                    if parts[0] == "lora_sdpo" and len(parts) > 1:
                        yield parts[1], []


def _graph(type_checking: bool = False) -> dict[str, dict[str, list[str]]]:
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges: dict[str, list[str]] = {}
        for mod, names in _imports(ast.parse(path.read_text(), str(path)), type_checking):
            if mod in MODULES and mod != path.stem:
                edges.setdefault(mod, []).extend(names)
        graph[path.stem] = edges
    return graph


def _cycle(graph: dict[str, dict]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, {})):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walk_sees_the_imports():
    g = _graph()
    assert "targets" in g["generate"] and "errors" in g["recipe"]  # top-level and from-imports
    assert "run" in g["cli"]  # one made inside a function
    assert _cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": []}, "b": {}}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_type_only_import_cycle():
    cycle = _cycle(_graph(type_checking=True))
    assert cycle is None, "import cycle through TYPE_CHECKING imports: " + " -> ".join(cycle)
    # the walk does see a TYPE_CHECKING import when asked
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .data import PairSet\n")
    assert list(_imports(tree)) == [] and list(_imports(tree, type_checking=True)) == [("data", ["PairSet"])]


def test_no_module_imports_another_modules_private_names():
    private = [(m, target, n) for m, edges in _graph().items() for target, names in edges.items() for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, private
