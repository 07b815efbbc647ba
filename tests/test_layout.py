"""The package's layout, read from its imports (every `import`, module-level or inside a
function, found with Python's own parser): the engine never imports the tooling, and no
module imports itself through others (no import cycles).

The engine is es_mpi's own modules, what a training run needs; es_mpi.tooling holds the
benchmark, scaling, reports and the memory planner. es_mpi.cli, the command line, is the
one module that reaches both: it is where each command is dispatched.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "es_mpi"
ENTRY = {"es_mpi.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The es_mpi modules `path` imports (`from es_mpi import x` counts x where x is a
    module, else the package it is named from)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    found.add(sub)
                elif node.module in modules:
                    found.add(node.module)
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_reader_finds_the_imports():
    """The graph is not empty by accident: known edges are there."""
    g = graph()
    assert "es_mpi.dist" in g["es_mpi.loop"] or "es_mpi.session" in g["es_mpi.loop"]
    assert "es_mpi.tooling.scaling" in g["es_mpi.tooling.bench"]
    assert "es_mpi.tooling.report" in g["es_mpi.cli"]
    assert "es_mpi.summary" in g["es_mpi.tooling.report"]
    # a cycle made up here is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_engine_never_imports_the_tooling():
    g = graph()
    engine = {m for m in g if not m.startswith("es_mpi.tooling") and m not in ENTRY}
    bad = {m: sorted(w for w in g[m] if w.startswith("es_mpi.tooling")) for m in engine}
    assert {m: w for m, w in bad.items() if w} == {}
