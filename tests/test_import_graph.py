"""The import graph of ``vstar_kernels`` has no circle, lazy (function-level) imports included: data flows one way,
contract -> reference -> backends -> ops -> diffusers -> demo/cli (../shared/DESIGN.md §8). An ``ast`` walk, no
import is run."""

from __future__ import annotations

import ast
from pathlib import Path

import vstar_kernels

PACKAGE = Path(vstar_kernels.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source. ``from X import name`` points at ``X.name``
    when that is a module of the package, else at X (an attribute of X's namespace)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "vstar_kernels.ops" in graph and "vstar_kernels.backends.extension" in graph
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    edges = import_graph()  # relative imports resolve, lazy ones count
    assert "vstar_kernels.differentiable" in edges["vstar_kernels.backends.extension"]
    assert "vstar_kernels.bench.sweep" in edges["vstar_kernels.cli"]  # imported inside a function


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others (not ``start`` itself unless in a circle)."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_the_unet_and_transformer_integrations_never_import_each_other():
    """``vstar_kernels.diffusers``: ``shared`` <- ``unet``, ``shared`` <- ``dit``, the entry points -> both; ``unet``
    and ``dit`` never reach each other, directly or through any module (a package's ``__init__`` running first is
    not an import edge), and ``shared`` reaches neither."""
    graph = import_graph()
    parts = {part: {m for m in graph if m == f"vstar_kernels.diffusers.{part}"
                    or m.startswith(f"vstar_kernels.diffusers.{part}.")} for part in ("unet", "dit", "shared")}
    assert all(len(modules) > 2 for modules in parts.values()), parts
    for part, other in (("unet", "dit"), ("dit", "unet"), ("shared", "unet"), ("shared", "dit")):
        for module in sorted(parts[part]):
            crossing = sorted(reachable(graph, module) & parts[other])
            assert not crossing, f"{module} reaches {other}: {crossing}"
    entry_points = set().union(*(reachable(graph, f"vstar_kernels.diffusers.{name}") for name in ("tar", "synopsis")))
    assert entry_points & parts["unet"] and entry_points & parts["dit"]


def test_reachable_follows_imports_through_other_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert reachable(graph, "a") == {"b", "c"}
    assert reachable(graph, "c") == set()
