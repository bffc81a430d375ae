"""The code's shape: packages in floors, no import cycle anywhere, short functions.

The floors, lowest first (docs/development.md draws them): ``kvshrink_base`` imports nothing of the project,
``convert`` stands on it, ``uptrain`` on both, and ``kvshrink`` (the demo, the decode bench, the console script)
on all three. A package imports only from floors below its own; subpackages count with their package, and an
import inside a function counts as much as one at the top of a file. Only imports under ``if TYPE_CHECKING:``
(annotations, never run) are exempt; the console script names the commands it runs as strings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("kvshrink_base", "convert", "uptrain", "kvshrink")  # lowest first
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    modules = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement names (``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".")
        if modules[module].name != "__init__.py":
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at run time, wherever the import statement is."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            deps.update(_imported(node, name, modules))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages its modules import."""
    out: dict[str, set[str]] = {p: set() for p in FLOORS}
    for module, deps in graph.items():
        top = module.split(".")[0]
        out[top] |= {d.split(".")[0] for d in deps} - {top}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append(path[path.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``module -> dep`` for every import of a package on the same floor or above the importer's."""
    floor = {p: i for i, p in enumerate(FLOORS)}
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if m.split(".")[0] != d.split(".")[0] and floor[d.split(".")[0]] >= floor[m.split(".")[0]]
    )


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_imports_inside_functions_and_skips_type_checking():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from uptrain import recipe\n"
        "def f():\n    from kvshrink import cli\n"
    )
    nodes = list(_runtime_nodes(ast.parse(source)))
    names = [a.name for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names]
    assert sorted(names) == ["TYPE_CHECKING", "cli"]
    assert upward_imports({"convert.x": {"uptrain.recipe"}, "uptrain.y": {"convert.x"}}) == [
        "convert.x -> uptrain.recipe"
    ]


def test_packages_stand_in_floors():
    """No package imports its own floor's neighbours or one above it, not even inside a function."""
    assert upward_imports(import_graph()) == []


def test_no_two_packages_import_each_other():
    assert cycles(package_graph(import_graph())) == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_the_base_imports_nothing_of_the_project():
    graph = import_graph()
    assert {
        d
        for m, deps in graph.items()
        if m.startswith(f"{FLOORS[0]}.") or m == FLOORS[0]
        for d in deps
        if not d.startswith(FLOORS[0])
    } == set()


def long_functions() -> list[str]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def test_no_function_longer_than_a_screen():
    assert long_functions() == []
