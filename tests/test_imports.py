"""The import arrows of docs/architecture.md, read from the code: one way, and no cycle.

The four folders install as one package (pyproject.toml's package-dir): ``broker/`` is
``tasync.broker``, ``producers/`` ``tasync.producers``, ``consumers/`` ``tasync.consumers``
and ``tasync/`` is ``tasync``; each folder is a layer. No file names a module by a
folder's bare name (``import broker``), which would load a second copy from the root.

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
import json
import os
import re
import subprocess
import sys
import tomllib
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


#: The folders that install inside ``tasync`` (pyproject.toml's package-dir): the folder
#: ``broker/`` is the package ``tasync.broker``.
NESTED = ("broker", "producers", "consumers")


def module_name(path: Path) -> str:
    """The import name of a file: ``broker/store.py`` is ``tasync.broker.store``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in NESTED:
        parts.insert(0, "tasync")
    return ".".join(parts)


def layer(module: str) -> str:
    """The folder (the layer) a module lives in: ``tasync.broker.store`` is in ``broker``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in NESTED else parts[0]


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
    assert "tasync.consumers.sync" in graph
    assert "tasync.broker.store" in graph["tasync.consumers.sync"]


@pytest.mark.parametrize("package", PACKAGES)
def test_arrows_point_one_way(package: str) -> None:
    breaches = [f"{source} imports {target}"
                for source, targets in sorted(import_graph().items())
                if layer(source) == package
                for target in sorted(targets)
                if layer(target) not in ALLOWED[package]]
    assert not breaches, "\n".join(breaches)


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) == []


def test_a_cycle_would_be_found() -> None:
    found = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(set(found)) == ["a", "b", "c"]
    assert find_cycle({"p": {"p.m"}, "p.m": {"q"}, "q": set()}) == []


# -- folders and import names ---------------------------------------------------------------------


def test_module_names_follow_the_build_mapping() -> None:
    assert module_name(ROOT / "broker" / "store.py") == "tasync.broker.store"
    init = ROOT / "consumers" / "delivery" / "__init__.py"
    assert module_name(init) == "tasync.consumers.delivery"
    assert module_name(ROOT / "tasync" / "cli.py") == "tasync.cli"
    assert [layer(m) for m in ("tasync.producers.relay", "tasync.node", "tasync")] == [
        "producers", "tasync", "tasync"]


def test_the_build_installs_every_package_folder_under_tasync() -> None:
    """pyproject.toml lists the packages one by one; a new package folder must be added there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"tasync.{name}": name for name in NESTED}
    folders = {module_name(init) for package in PACKAGES
               for init in (ROOT / package).rglob("__init__.py")}
    assert sorted(config["packages"]) == sorted(folders)


#: A folder's bare dotted name, as in ``broker.store``.
BARE = re.compile(r"(?<![\w.\\/-])(?:{})(?:\.[A-Za-z_]\w*)+".format("|".join(NESTED)))


def bare_names(path: Path, known: set[str], root: Path = ROOT) -> Iterator[str]:
    """Imports and strings of ``path`` that name a module by a folder's bare name."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [name for name in BARE.findall(node.value)
                     if "tasync." + ".".join(name.split(".")[:2]) in known]
        else:
            continue
        for name in names:
            if name.split(".")[0] in NESTED:
                yield f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}: {name}"


def test_nothing_names_a_module_by_a_folders_bare_name() -> None:
    """``import broker`` works only from the repository root, as a second copy of the module.

    The installed names are ``tasync.broker`` and so on; imports and module paths in strings
    (``monkeypatch.setattr("tasync.broker.audit.time.monotonic", ...)``, ``python -c`` code,
    docstrings) use them everywhere, tests and benchmarks included.
    """
    known = set(import_graph())
    files = [path for folder in (*PACKAGES, "tests", "benchmarks", "docs", "scripts")
             if (ROOT / folder).is_dir() for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100  # the listing worked
    found = [hit for path in files for hit in bare_names(path, known)]
    assert not found, "\n".join(found)


def test_a_bare_name_would_be_found(tmp_path: Path) -> None:
    path = tmp_path / "example.py"
    path.write_text(('import {0}.store\nfrom {2} import sync\n'
                     'X = "{1}.relay.RelayFaults"\nY = "tasync.{0}.store"\n').format(*NESTED))
    found = [hit.rpartition(": ")[2] for hit in bare_names(path, set(import_graph()), tmp_path)]
    broker, producers, consumers = NESTED
    assert found == [f"{broker}.store", consumers, f"{producers}.relay.RelayFaults"]


def test_the_installed_package_maps_the_folders(tmp_path: Path) -> None:
    """From outside the repository the names are ``tasync.*`` and the bare names are gone.

    Fails when the environment holds an install made before the folders were mapped
    (an editable install keeps its map): ``pip install -e .`` again.
    """
    code = ("import importlib.util, json, tasync.broker.store, tasync.consumers.delivery.worker\n"
            "bare = [importlib.util.find_spec(n) for n in ('broker', 'producers', 'consumers')]\n"
            "print(json.dumps([tasync.broker.store.__file__] + [s and s.origin for s in bare]))")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env=env)
    store, *bare = json.loads(out.stdout)
    assert Path(store).resolve() == ROOT / "broker" / "store.py" or "site-packages" in store
    assert not [origin for origin in bare if origin and str(ROOT) in origin], bare
