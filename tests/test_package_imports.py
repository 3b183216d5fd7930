"""Kiln's packages import downward only: no module imports another package's private helper, and no
two packages import each other, directly or around a loop (DESIGN.md's data flow, STYLE.md's layers).

Read from the source with ``ast``; imports inside functions count (they are the same dependency,
paid later), those under ``if TYPE_CHECKING:`` do not.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" or isinstance(t, ast.Attribute) and \
        t.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every kiln import in ``tree``."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "kiln")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "kiln":
                found.append((base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Package-level import edges (kiln.X → kiln.Y) and the private imports that cross a package."""
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for path in sorted((SRC / "kiln").rglob("*.py")):
        module = _module_name(path)
        if path.name == "__main__.py":
            continue            # `python -m` entry points are run, never imported: they close no import loop
        for target, names in _imports(ast.parse(path.read_text(encoding="utf-8")), module,
                                      path.name == "__init__.py"):
            src_pkg, dst_pkg = ".".join(module.split(".")[:2]), ".".join(target.split(".")[:2])
            if src_pkg != dst_pkg and dst_pkg != "kiln":
                edges.setdefault(src_pkg, set()).add(dst_pkg)
            parts = target.split(".")
            for i, part in enumerate(parts):         # a private module: visible inside the package holding it
                if part.startswith("_") and not part.startswith("__"):
                    holder = ".".join(parts[:i])
                    if not (module == holder or module.startswith(holder + ".")):
                        private.append(f"{module} imports the private module {target}")
                    break
            else:
                # a private name: visible inside the package that holds its module
                holder = ".".join(parts[:-1]) if len(parts) > 1 else parts[0]
                for name in names:
                    if name.startswith("_") and not name.startswith("__") and \
                            not (module == holder or module.startswith(holder + ".")):
                        private.append(f"{module} imports {target}.{name}, a private name")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            strong(v)
    return found


def test_no_module_imports_a_private_helper_of_another_package() -> None:
    _, private = _graph()
    assert private == [], "\n".join(private)


def test_no_import_cycle_between_packages() -> None:
    edges, _ = _graph()
    cycles = _cycles(edges)
    detail = ["; ".join(f"{a} -> {sorted(edges[a] & set(c))}" for a in c) for c in cycles]
    assert cycles == [], "\n".join(detail)


def test_the_checks_see_what_they_look_for(tmp_path) -> None:
    """The detectors themselves: a private import across packages and a two-package loop are found,
    a private module used inside its own package is not."""
    edges = {"kiln.a": {"kiln.b"}, "kiln.b": {"kiln.c"}, "kiln.c": {"kiln.a"}, "kiln.d": {"kiln.a"}}
    assert _cycles(edges) == [["kiln.a", "kiln.b", "kiln.c"]]
    assert _cycles({"kiln.a": {"kiln.b"}, "kiln.b": set()}) == []
    tree = ast.parse("from kiln.x._util import f\nfrom kiln.y.mod import _g\nimport kiln.z\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kiln.q import T\n"
                     "def late():\n    from .sibling import h\n")
    got = _imports(tree, "kiln.x.mod", False)
    assert got == [("kiln.x._util", ["f"]), ("kiln.y.mod", ["_g"]), ("kiln.z", []), ("kiln.x.sibling", ["h"])]
