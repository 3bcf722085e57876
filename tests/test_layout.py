"""The package layout stays one-way: no import cycle between vlmopt modules (every import counts,
the lazy ones inside functions too), library code never imports the command line, and the
installed wheel ships every package that lies on disk."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# NOTE: pyproject maps two top-level folders into the package (vlmopt.passes, vlmopt.search)
PACKAGE_DIRS = {"vlmopt": ROOT / "vlmopt", "vlmopt.passes": ROOT / "passes",
                "vlmopt.search": ROOT / "search"}
# the command line: its verbs, argument types and the bench verb; nothing else may import these
CLI = ("vlmopt.cli", "vlmopt.cli_")
CLI_USERS = {"vlmopt.bench"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PACKAGE_DIRS.items():
        for f in d.rglob("*.py"):
            rel = f.relative_to(d).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((pkg, *rel))
            if pkg == "vlmopt" and rel and f"vlmopt.{rel[0]}" in PACKAGE_DIRS:
                continue
            out[name] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the vlmopt modules it imports anywhere in its body. ``from P import n`` names the
    module P.n when that is a module, else P (a package's __init__ or a plain module)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in mods.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]
            else:
                continue
            for n in names:
                r = resolve(n) if n.startswith("vlmopt") else None
                if r and r != mod:
                    deps.add(r)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "vlmopt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from vlmopt import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    mods = {"vlmopt": pkg / "__init__.py", "vlmopt.a": pkg / "a.py", "vlmopt.b": pkg / "b.py"}
    assert cycles(import_graph(mods)) == [["vlmopt.a", "vlmopt.b"]]


def test_no_import_cycle_between_vlmopt_modules():
    mods = modules()
    assert {"vlmopt.cli", "vlmopt.pipeline", "vlmopt.passes.drop_tokens",
            "vlmopt.search.study"} <= set(mods)
    found = cycles(import_graph(mods))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_library_code_does_not_import_the_cli():
    graph = import_graph(modules())
    bad = {m: sorted(d for d in deps if d.startswith(CLI))
           for m, deps in graph.items() if not m.startswith(CLI) and m not in CLI_USERS}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"library modules importing the CLI: {bad}"


def test_wheel_lists_every_package():
    """pyproject's explicit package list must name every folder with an __init__.py: a missing one
    is absent from a non-editable install."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    assert {k: str(Path(v)) for k, v in conf["package-dir"].items()} == {
        k: str(v.relative_to(ROOT)) for k, v in PACKAGE_DIRS.items()}
    on_disk = {m for m, f in modules().items() if f.name == "__init__.py"}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
