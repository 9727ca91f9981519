"""The import graph of the project's own modules: no cycles, and the layers of lutstore/ import
one way (docs/internals.md, "Module map").

Every import statement counts, wherever it stands: at the top, inside a function, or under
`if TYPE_CHECKING:` (a cycle hidden there still ties the two modules together for a reader and a
refactoring tool). `from pkg import name` is an import of pkg.name where that is a module of ours,
else of pkg; a package's own __init__ is not counted as imported by its submodules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lutstore", "inference", "testing", "benchmarks", "demo")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the project's packages (generated code aside)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            if "v1" in rel.parts:   # protoc's output
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that module `name` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from .x import y
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    # `import a.b.c` names a.b.c; keep the longest prefix that is one of ours
    resolved = set()
    for target in targets:
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != name:
            resolved.add(".".join(parts))
    return resolved


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _explain(graph: dict[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a] & inside))


def test_no_import_cycles():
    graph = import_graph()
    assert "lutstore.client.lut_client" in graph and "inference.lut" in graph   # the walk found the tree
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_explain(graph, c) for c in found)


def test_the_cycle_check_sees_imports_in_functions_and_under_type_checking(tmp_path):
    """The checker itself: a cycle closed only by a function-level or TYPE_CHECKING import is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import c\n")
    (tmp_path / "c.py").write_text("def f():\n    from a import thing\n")
    modules = {"a", "b", "c"}
    graph = {m: imports_of(m, tmp_path / f"{m}.py", modules) for m in modules}
    assert cycles(graph) == [["a", "b", "c"]]


# Which parts of lutstore/ may not reach which (through any chain of imports).
NEVER = [
    ("lutstore.client", ("lutstore.daemon", "lutstore.storage", "lutstore.ingest", "lutstore.cli")),
    ("lutstore.formats", ("lutstore.daemon", "lutstore.storage", "lutstore.client", "lutstore.ingest", "lutstore.cli")),
    ("lutstore.storage", ("lutstore.daemon", "lutstore.client", "lutstore.ingest", "lutstore.cli")),
    ("lutstore.daemon", ("lutstore.client", "lutstore.ingest", "lutstore.cli")),
    ("lutstore.ingest", ("lutstore.daemon", "lutstore.client", "lutstore.cli")),
    ("inference", ("lutstore.daemon", "lutstore.storage")),
]


@pytest.mark.parametrize("part,forbidden", NEVER, ids=[p for p, _ in NEVER])
def test_layers_import_one_way(part, forbidden):
    graph = import_graph()
    members = [m for m in graph if m == part or m.startswith(part + ".")]
    assert members, part
    wrong = {(m, r) for m in members for r in reachable(graph, m)
             if any(r == f or r.startswith(f + ".") for f in forbidden)}
    assert not wrong, f"{part} reaches what it must not: {sorted(wrong)[:5]}"


def test_every_import_of_ours_names_a_module_of_this_tree():
    """`from lutstore.x import y` where lutstore/x.py is not here would still import, from whatever
    lutstore an editable install points at: a module moved away must not be imported by its old path
    (tests and benchmarks included)."""
    def here(name: str) -> bool:
        path = REPO / name.replace(".", "/")
        return path.with_suffix(".py").is_file() or path.is_dir()

    wrong = []
    for path in sorted(REPO.glob("tests/*.py")) + [f for f in module_files().values()]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES and not here(name):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not wrong, "; ".join(wrong)


def test_the_client_library_loads_no_storage_or_daemon():
    """At run time too: `import lutstore.client` brings in neither rocksdict nor the daemon."""
    code = ("import sys, lutstore.client\n"
            "bad = sorted(m for m in sys.modules if m == 'rocksdict' or m.startswith(('lutstore.daemon', "
            "'lutstore.storage', 'redis')))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
