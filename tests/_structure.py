"""The package's structure check (from the project's tools/structure.py, kept here so the suite
runs it): import cycles between modules (imports inside functions count), imports between
train/ and eval/ (siblings over the shared runtime: neither may import the other), and files
over MAX_LINES lines. `findings(package_dir)` returns one line per finding, [] when clean.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 400
APART = ("train", "eval", "infer")  # subpackages that must not import one another


def _module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, set[str]]]:
    """(module -> file, module -> the package modules it imports). A `from a import b` names both
    a and a.b; a package's __init__ is not an edge (importing it says nothing of its modules)."""
    mods = {_module_of(p, root): p for p in sorted(root.rglob("*.py"))}

    def targets(cur: str, node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against the current package
                pkg = cur.split(".")
                if mods[cur].name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        return {n for n in names if n in mods and n != cur and not cur.startswith(n + ".")}

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[m] |= {t for t in targets(m, node) if mods[t].name != "__init__.py"}
    return mods, edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def findings(root: str | Path) -> list[str]:
    """Every structural problem of the package at `root` (e.g. Path("retro_jax")), one line each."""
    root = Path(root)
    mods, edges = import_graph(root)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    out += [f"{a} imports {b} (train/, eval/ and infer/ stand side by side on the runtime)"
            for a in sorted(mods) for b in sorted(edges[a])
            if _subpackage(a) in APART and _subpackage(b) in APART and _subpackage(a) != _subpackage(b)]
    out += [f"{p}: {n} lines (keep files under about {MAX_LINES})" for p in mods.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    return out
