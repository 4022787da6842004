"""The leaf packages' import structure: no circle inside a package, no import of another
of sourcebox's packages, and every module importable on its own in a fresh interpreter.

Import circles work until someone moves an import to the top of a file or imports the
modules in another order; this finds them from the source, before that happens.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEAVES = ("capture", "sandbox")
OURS = {"capture", "sandbox", "runner"}


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / package).glob("*.py")):
        found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _runtime_imports(tree: ast.AST):
    """Import statements that run: anywhere (functions too), except under ``if TYPE_CHECKING:``,
    whose imports name types for checkers and never execute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:  # ast.walk visits them too: mark them to skip
                for child in ast.walk(inner):
                    child._type_only = True
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "_type_only", False):
            yield node


def imported_names(module: str, path: Path, known: set[str] = frozenset()) -> set[str]:
    """Fully qualified names of the modules ``module`` imports; ``known``: the package's
    modules, to tell ``from . import submodule`` from ``from . import name_in_init``."""
    package_parts = module.split(".") if path.stem == "__init__" else module.split(".")[:-1]
    names = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = ".".join(package_parts[:len(package_parts) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module
        if node.module:
            names.add(target)
        for alias in node.names:
            names.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return names


def graph(package: str) -> dict[str, set[str]]:
    known = modules(package)
    return {module: {name for name in imported_names(module, path, set(known)) if name in known and name != module}
            for module, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_circle():
    # CONTROL: the check below would see a circle like the one sandbox.policy had with guard.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", LEAVES)
def test_no_import_circle_inside_the_package(package):
    edges = graph(package)
    assert len(edges) > 5, f"found too few modules in {package}/"
    # The package's __init__ is a node too: a module importing a name from it closes a
    # circle, since __init__ imports the submodules.
    cycle = find_cycle(edges)
    assert cycle is None, (f"import circle in {package}: {' -> '.join(cycle)}. Move what both sides need "
                           "into a module below them, or pass it in (docs/ARCHITECTURE.md).")


@pytest.mark.parametrize("package", LEAVES)
def test_a_leaf_package_imports_no_other_sourcebox_package(package):
    for module, path in modules(package).items():
        others = {name for name in imported_names(module, path) if name.split(".")[0] in OURS - {package}}
        assert not others, f"{module} imports {sorted(others)}: {package} is a leaf (runner composes the leaves)"


@pytest.mark.parametrize("module", [m for package in LEAVES for m in modules(package)])
def test_each_module_imports_on_its_own_in_a_fresh_interpreter(module):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", "import importlib, sys; importlib.import_module(sys.argv[1])",
                             module], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} first failed:\n{result.stderr[-3000:]}"
