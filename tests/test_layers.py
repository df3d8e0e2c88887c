"""The package layers import in one direction, and no module imports itself back in a cycle.

Read from the source with ``ast`` (no import needed), so the check also covers imports inside
functions, which a runtime check would miss.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# lowest first: a package may import only from itself and the packages before it
LAYERS = ["run_io", "datamodules", "text", "lightning_modules", "callbacks", "retrieval", "experiments"]
FOLDER = {
    "run_io": REPO / "medmetric" / "run_io",
    "text": REPO / "medmetric" / "text",
    "retrieval": REPO / "medmetric" / "retrieval",
    "datamodules": REPO / "datamodules",
    "lightning_modules": REPO / "lightning_modules",
    "callbacks": REPO / "callbacks",
    "experiments": REPO / "experiments",
}


def module_name(path: Path) -> str:
    for package, folder in FOLDER.items():
        if folder in path.parents:
            rest = path.relative_to(folder).with_suffix("").parts
            rest = rest[:-1] if rest[-1] == "__init__" else rest
            return ".".join(("medmetric", package, *rest))
    raise AssertionError(path)


def medmetric_imports(path: Path) -> set[str]:
    """Every ``medmetric.*`` module named by an import statement in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "medmetric" or name.startswith("medmetric.")}


def all_modules() -> dict[str, set[str]]:
    return {
        module_name(path): medmetric_imports(path)
        for folder in FOLDER.values()
        for path in sorted(folder.rglob("*.py"))
    }


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_imports_point_down_the_layers_only():
    backwards = [
        f"{module} imports {target}"
        for module, targets in all_modules().items()
        for target in targets
        if target != "medmetric" and layer_of(target) > layer_of(module)
    ]
    assert not backwards, "imports that point back up the layers:\n" + "\n".join(sorted(backwards))


def test_models_import_nothing_from_callbacks():
    models = {m: t for m, t in all_modules().items() if m.startswith("medmetric.lightning_modules")}
    assert models, "no model modules found: is FOLDER right?"
    assert not [m for m, targets in models.items() if any(t.startswith("medmetric.callbacks") for t in targets)]


def _resolve(target: str, known: set[str]) -> str | None:
    """``from medmetric.x import y``: y may be a module or a name in x; take the deepest module."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_cycles():
    graph = all_modules()
    known = set(graph)
    edges = {m: {r for t in targets if (r := _resolve(t, known)) and r != m and not m.startswith(r + ".")}
             for m, targets in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle of the layers
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_a_backward_import(tmp_path):
    """Break it on purpose: a model importing a callback must be reported."""
    fake = REPO / "lightning_modules" / "x.py"
    source = tmp_path / "x.py"
    source.write_text("from medmetric.callbacks.handoff import StageHandoff\n")
    assert medmetric_imports(source) == {"medmetric.callbacks.handoff"}
    assert layer_of("medmetric.callbacks.handoff") > layer_of(module_name(fake))
