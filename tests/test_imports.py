"""The import arrows of docs/architecture.md, read from the code: one way, and no cycle.

``broker`` is the bottom layer and imports none of the others; ``producers`` and ``consumers``
import ``broker`` and never each other; ``tasync`` (the runtime and the command line) may import
everything. Between modules there is no cycle, counting every import a module makes, lazy ones
and those made only for type checking included: a cycle means two modules cannot be understood
(or tested) one without the other.
"""

from __future__ import annotations

import ast
import functools
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "producers", "consumers", "tasync")

#: Which packages each package may import.
ALLOWED = {
    "broker": {"broker"},
    "producers": {"broker", "producers"},
    "consumers": {"broker", "consumers"},
    "tasync": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """Every project module ``path`` imports (a ``from m import x`` counts ``m.x`` if a module)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    known = {module_name(path) for path in files}
    return {module_name(path): set(imported(path, known)) - {module_name(path)} for path in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (empty when there is none), found by the standard library.

    A package's ``__init__`` importing its own modules is how packages work, not a cycle.
    """
    edges = {source: {target for target in targets if not target.startswith(source + ".")}
             for source, targets in graph.items()}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return []


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "consumers.sync" in graph and "broker.store" in graph["consumers.sync"]


@pytest.mark.parametrize("package", PACKAGES)
def test_arrows_point_one_way(package: str) -> None:
    breaches = [f"{source} imports {target}"
                for source, targets in sorted(import_graph().items())
                if source.split(".")[0] == package
                for target in sorted(targets)
                if target.split(".")[0] not in ALLOWED[package]]
    assert not breaches, "\n".join(breaches)


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) == []


def test_a_cycle_would_be_found() -> None:
    found = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(set(found)) == ["a", "b", "c"]
    assert find_cycle({"p": {"p.m"}, "p.m": {"q"}, "q": set()}) == []
