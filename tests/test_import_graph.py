"""No import cycles inside vsem_lens (every import counts, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vsem_lens"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _edges() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            root = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(root + ([node.module] if node.module else [])) if node.level else (node.module or "")
            for candidate in [f"{target}.{alias.name}" for alias in node.names] + [target]:
                if candidate in modules and candidate != module:
                    # A package's __init__ is imported on the way to its submodules: not a cycle of meaning.
                    if not module.startswith(candidate + "."):
                        edges[module].add(candidate)
                    break
    return edges


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_read():
    edges = _edges()
    assert "vsem_lens.frames" in edges["vsem_lens.affinity"]
    assert "vsem_lens.lenses" in edges["vsem_lens.tuned"]
