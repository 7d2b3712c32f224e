"""No import cycles among wconv's modules, counting imports inside functions too.

A lazy import inside a function hides a cycle from Python at import time, but the two modules
still depend on each other: the design rule is that dependencies point one way. The graph is
read from the source (ast), so nothing is imported or run. `from pkg import submodule` is an
edge to the submodule; an edge to a package is counted only when names defined in its
__init__ are taken (every submodule imports its parent package implicitly, so that edge alone
is no design choice).
"""
from __future__ import annotations

import ast
import os

import wconv

WCONV_DIR = os.path.dirname(os.path.abspath(wconv.__file__))


def modules(package_dir: str) -> dict:
    """{dotted module name: path} for every .py file under package_dir."""
    root, out = os.path.dirname(package_dir), {}
    for directory, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def import_graph(package_dir: str) -> dict:
    mods = modules(package_dir)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".") if is_package else m.split(".")[:-1]
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] + ([base] if any(t not in mods for t in subs) else [])
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_wconv_has_no_import_cycles():
    graph = import_graph(WCONV_DIR)
    assert len(graph) > 50 and graph["wconv.convert.mirror"]  # the graph was really read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")" for c in found)


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(str(pkg))) == [["pkg.a", "pkg.sub.b"]]
