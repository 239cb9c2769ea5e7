"""The import graph of netstack/, virtio/ and tunnel/: every module imports, every name an
import statement asks for exists (also the imports inside functions, which run only when
their code does), no module imports itself through others, the packages of tunnel/ depend on
each other one way, and the layers point down: netstack imports nothing from virtio or
tunnel, virtio nothing from tunnel.

The graph is read from the source (`ast`), so a cycle hidden in a function-level import is
found as surely as one at the top of a module; imports under `if TYPE_CHECKING:` never run
and are left out."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("netstack", "virtio", "tunnel")
# The sub-packages of tunnel/ (and tunnel/ itself: its own modules) whose dependencies on
# each other must go one way: the CLI uses the lab, the hub and the host mode, never back.
TUNNEL_PACKAGES = ("tunnel", "tunnel.cli", "tunnel.host", "tunnel.lab")
# Which top-level packages each may import from.
LAYERS = {"netstack": set(), "virtio": {"netstack"}, "tunnel": {"netstack", "virtio"}}


def _modules() -> dict[str, Path]:
    """Every module of PACKAGES by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _import_statements(tree: ast.AST):
    """Every Import and ImportFrom in `tree`, at any depth, but not under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_statements(node)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an ImportFrom names, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """What `module` imports from PACKAGES: (module, name or None, line), one per name."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = []
    for node in _import_statements(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] in PACKAGES]
            continue
        source = _absolute(module, node)
        if source.split(".")[0] in PACKAGES:
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports (`from p import m` of a submodule m
    counts as importing p.m)."""
    graph = {}
    for module in MODULES:
        targets = set()
        for source, name, _ in _imports(module):
            if name is not None and f"{source}.{name}" in MODULES:
                targets.add(f"{source}.{name}")
            elif source in MODULES:
                targets.add(source)
        graph[module] = targets - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _package_of(module: str, packages: tuple[str, ...]) -> str:
    """The longest of `packages` that holds `module`."""
    return max((p for p in packages if module == p or module.startswith(p + ".")), key=len)


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_level_and_type_checking_imports_are_told_apart():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from tunnel.hub import Hub\n"
                     "def f():\n    from tunnel.cli.main import main\n")
    assert [node.module for node in _import_statements(tree)] == ["typing", "tunnel.cli.main"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports_and_every_name_it_imports_exists(module):
    importlib.import_module(module)
    for source, name, line in _imports(module):
        where = f"{MODULES[module].relative_to(ROOT)}:{line}"
        try:
            imported = importlib.import_module(source)
        except ImportError as exc:
            pytest.fail(f"{where}: {exc}")
        if name in (None, "*") or hasattr(imported, name):
            continue
        try:
            importlib.import_module(f"{source}.{name}")
        except ImportError:
            pytest.fail(f"{where}: {source} has no {name}")


def test_no_module_imports_itself_through_others():
    assert _cycle(_graph()) is None


def test_the_packages_of_tunnel_depend_on_each_other_one_way():
    between: dict[str, set[str]] = {package: set() for package in TUNNEL_PACKAGES}
    for module, targets in _graph().items():
        if module.split(".")[0] != "tunnel":
            continue
        home = _package_of(module, TUNNEL_PACKAGES)
        between[home] |= {_package_of(t, TUNNEL_PACKAGES) for t in targets
                          if t.split(".")[0] == "tunnel"} - {home}
    assert _cycle(between) is None
    assert "tunnel.cli" not in set().union(*between.values())  # the CLI is on top


def test_netstack_imports_nothing_above_it_and_virtio_nothing_from_tunnel():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items()
             for target in targets
             if target.split(".")[0] not in LAYERS[module.split(".")[0]] | {module.split(".")[0]}]
    assert wrong == []
