"""The package's layering (docs/architecture.md), checked on the import graph of the source files.

    core <- lenses <- readout <- geometry <- calibration, taskspace <- report <- cli

A subpackage may import its own modules and any layer to its left, never one to its right; calibration
and taskspace are siblings and do not import each other. Names starting with an underscore stay inside
their subpackage. The graph has no cycles, module-level or function-level imports alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vsem_lens"
LAYERS = {"core": 0, "lenses": 1, "readout": 2, "geometry": 3, "calibration": 4, "taskspace": 4, "report": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``vsem_lens`` module imported by ``path`` (anywhere in the file), with the names taken from it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "vsem_lens":
                found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "vsem_lens"]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(path): imports_of(path) for path in SOURCES}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    flat = [module_name(p) for p in SOURCES if p.parent == PACKAGE and p.name != "__init__.py"]
    assert flat == [], f"modules outside the layered subpackages: {flat}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def layering_violations(module: str, imports: list[tuple[str, list[str]]]) -> list[str]:
    """What ``module`` imports against the layering rule (empty when it follows it)."""
    own, found = layer_of(module), []
    for target, names in imports:
        other = layer_of(target)
        if other is None:
            found.append(f"{module} imports {target}, which is outside the layers (the top-level package?)")
        elif other != own and LAYERS[other] >= LAYERS[own]:
            found.append(f"{module} ({own}) imports upward or sideways: {target} ({other})")
        elif other != own and (private := [n for n in names if n.startswith("_")]):
            found.append(f"{module} imports private names of another subpackage: {target}.{private}")
    return found


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer_of(m)))
def test_imports_go_down_the_layers(module):
    assert layering_violations(module, GRAPH[module]) == []


def test_the_layering_check_can_fail():
    assert layering_violations("vsem_lens.core.models", [("vsem_lens.readout.basis", ["SemanticBasis"])])
    assert layering_violations("vsem_lens.calibration.heads", [("vsem_lens.taskspace.space", ["x"])])
    assert layering_violations("vsem_lens.report.build", [("vsem_lens.core.stats", ["_private"])])
    assert layering_violations("vsem_lens.readout.basis", [("vsem_lens", ["core"])])
    assert not layering_violations("vsem_lens.report.build", [("vsem_lens.report.plots", ["_private"])])


def find_cycle(graph: dict[str, list[tuple[str, list[str]]]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules and names), or None."""
    modules = set(graph)

    def targets(module: str) -> set[str]:
        out = set()
        for target, names in graph[module]:
            submodules = {f"{target}.{name}" for name in names} & modules
            # ``from . import plots`` imports a sibling module, not the package's re-exports
            out |= submodules if submodules and len(submodules) == len(names) else {target} & modules
        return out - {module}

    edges = {module: targets(module) for module in modules}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(modules):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_can_fail():
    graph = dict(GRAPH)
    graph["vsem_lens.core.errors"] = [*GRAPH["vsem_lens.core.errors"], ("vsem_lens.core.models", ["HookedModel"])]
    assert find_cycle(graph) is not None


def test_top_level_api_is_small():
    import vsem_lens

    functions_and_classes = [n for n in vsem_lens.__all__ if n not in LAYERS]
    assert len(functions_and_classes) <= 24, functions_and_classes
    for name in vsem_lens.__all__:
        assert hasattr(vsem_lens, name), name
