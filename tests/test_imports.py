"""raydae's own import graph has no cycle, and no function imports a raydae module (imports at the top).

The graph is read with `ast`, not by importing: top-level and function-level imports both count, since a
cycle hidden behind a function-local import is still a cycle (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "raydae"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package's __init__ is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, files: dict[str, Path]) -> list[str]:
    """The dotted names an import statement in `module` asks for (absolute, possibly outside the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, `level - 1` packages up
        anchor = module.split(".") if _is_package(module, files) else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    # `from raydae import launch` imports the module raydae.launch; `from raydae.x import name` imports raydae.x.
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]


def _targets(name: str, importer: str, files: dict[str, Path]) -> set[str]:
    """The package's modules that importing `name` runs: the module itself and the packages above it, but
    not the packages above the importer (they are already being imported when the importer runs)."""
    parts = name.split(".")
    above_importer = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    above = {".".join(parts[:i]) for i in range(1, len(parts))} - above_importer
    return ({name} | above) & set(files) - {importer}


def import_graph(files: dict[str, Path], package: str = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package's modules it imports, anywhere in the file; function-local imports of the package)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    local: list[str] = []
    top = files[package].parent.parent  # the folder holding the package
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [n for n in _imported_names(node, module, files) if n == package or n.startswith(package + ".")]
            for name in names:
                graph[module] |= _targets(name, module, files)
            if names and id(node) in inside:
                local.append(f"{path.relative_to(top)}:{node.lineno} imports {', '.join(dict.fromkeys(names))}")
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph, _ = import_graph(module_files())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among raydae's modules: " + " -> ".join(cycle)


def test_no_function_local_import_of_raydae():
    _, local = import_graph(module_files())
    assert not local, "function-local imports of raydae's own modules (move them to the top):\n" + "\n".join(local)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_graph_sees_a_cycle_behind_a_function_local_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("import os\n\ndef f():\n    from .. import a\n    return a\n")
    files = module_files(package, "pkg")
    graph, local = import_graph(files, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert local == ["pkg/sub/b.py:4 imports pkg.a"]
