"""Imports point one way: no cycle in quillgpt/ (imports inside functions counted), and the layer
contracts in pyproject.toml (import-linter, also run by `make lint`) hold."""

import sys
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def import_cycles(package: str) -> list[list[str]]:
    """Every group of modules that import one another, directly or not (Tarjan's strongly connected
    components over grimp's graph, which holds every import statement, those inside functions too),
    each as one cycle through it, shortest chains first."""
    graph = grimp.build_graph(package, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                groups.append(sorted([v, *group]))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for module in edges:
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(limit)
    cycles = []
    for group in groups:  # one readable cycle per group: a -> ... -> b -> a
        first, members = group[0], set(group)
        back = min(
            (list(graph.find_shortest_chain(w, first)) for w in edges[first] if w in members),
            key=len,
        )
        cycles.append([first, *back])
    return cycles


def test_quillgpt_has_no_import_cycle():
    cycles = import_cycles("quillgpt")
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclic.c import g\n    return g\n")
    (pkg / "c.py").write_text("import cyclic.a\n\ndef g():\n    return 1\n")
    (pkg / "d.py").write_text("import cyclic.a\n")  # imports into the cycle, is not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic") == [["cyclic.a", "cyclic.b", "cyclic.c", "cyclic.a"]]


def test_the_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out
