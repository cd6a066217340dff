"""The folder tree is the architecture: imports of the package's own modules point one way,

    common <- engines <- build / train / evaluate / fixtures <- report <- run <- demo <- cli

and there is no import cycle. Found by walking every module's syntax tree (imports inside
functions included), so a lazy import cannot hide a wrong direction or a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignx_ray"
# Each top-level part of the package and its layer; a module imports from lower layers, and
# from its own part (the layer-2 parts are siblings that never import one another).
LAYERS = {
    "common": 0,
    "engines": 1,
    "build": 2,
    "train": 2,
    "evaluate": 2,
    "fixtures": 2,
    "report": 3,
    "run": 4,
    "demo": 5,
    "cli": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path) -> set[str]:
    """The package's own modules that `path` imports (`from alignx_ray.x import y` names the
    module alignx_ray.x.y when that is a module, else alignx_ray.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alignx_ray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignx_ray"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found - {"alignx_ray"}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: own_imports(path) for name, path in MODULES.items()}


def part(module: str) -> str:
    return module.split(".")[1]


def wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    """Imports of another part at the same or a higher layer."""
    return sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph.items()
        if importer != "alignx_ray"
        for imported in targets
        if part(imported) != part(importer) and LAYERS[part(imported)] >= LAYERS[part(importer)]
    )


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (depth-first search), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = path + [module, target]
                return cycle[cycle.index(target) :]
            if target not in state and (cycle := visit(target, path + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert {part(m) for m in MODULES if m != "alignx_ray"} == set(LAYERS)


def test_imports_point_one_way():
    wrong = wrong_direction(GRAPH)
    assert not wrong, "imports against the one-way rule:\n" + "\n".join(wrong)


def test_no_import_cycle():
    cycle = a_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_a_wrong_direction_and_a_cycle():
    """The same checks on a made-up graph flag what they must."""
    graph = {
        "alignx_ray.common.a": {"alignx_ray.build.b"},
        "alignx_ray.build.b": {"alignx_ray.build.c"},
        "alignx_ray.build.c": {"alignx_ray.common.a"},
    }
    assert wrong_direction(graph) == ["alignx_ray.common.a -> alignx_ray.build.b"]
    assert a_cycle(graph) == ["alignx_ray.build.b", "alignx_ray.build.c", "alignx_ray.common.a", "alignx_ray.build.b"]
    assert a_cycle({"alignx_ray.build.b": {"alignx_ray.common.a"}}) is None
